//! The relay under test: where it listens, which process it is, and how to start and stop one.
//!
//! `--spawn roomcast|node` starts a relay on a free loopback port with load-friendly settings
//! (a rate limit nobody reaches, a connection cap at the open-file limit) so the harness knows its
//! PID; `--url` points at a relay someone else started, whose PID is given with `--pid` or found
//! from the listening port. The harness targets loopback addresses unless the operator says, with
//! `--i-own-the-target`, that a non-loopback relay (or its load balancer) is theirs to load: then
//! `ws://` and `wss://` (TLS) targets anywhere are allowed, and relay CPU and memory are not
//! measured (the process is on another machine).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use crate::proto::TlsPlan;
use crate::sys;

/// The token `--spawn` configures; not the development token, so a spawned relay does not warn.
pub const SPAWN_TOKEN: &str = "load-token";

/// Which relay `--spawn` starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayKind {
    Roomcast,
    Node,
}

impl RelayKind {
    pub fn name(self) -> &'static str {
        match self {
            RelayKind::Roomcast => "roomcast",
            RelayKind::Node => "node-ws",
        }
    }
}

/// Where to send load and whom to measure.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub addr: SocketAddr,
    pub host_header: String,
    pub path: String,
    pub token: String,
    pub origin: String,
    pub pid: Option<u32>,
    /// `wss://`: TLS to the target.
    pub tls: Option<TlsPlan>,
    /// Several relay nodes (`--nodes`): connections are spread over them, and CPU, memory and
    /// counters are summed over them. Empty for one relay (`addr`, `pid`).
    pub nodes: Vec<Node>,
    /// Processes the relays lean on (Redis), measured beside them.
    pub backing: Vec<Backing>,
}

/// One relay node of a multi-node target.
#[derive(Debug, Clone)]
pub struct Node {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
}

/// A Redis server of a multi-node target.
#[derive(Debug, Clone)]
pub struct Backing {
    pub port: u16,
    pub pid: u32,
}

impl Target {
    /// Every relay process to measure: the nodes', or the one relay's.
    pub fn pids(&self) -> Vec<u32> {
        if self.nodes.is_empty() {
            self.pid.into_iter().collect()
        } else {
            self.nodes.iter().filter_map(|n| n.pid).collect()
        }
    }

    /// Every relay address to read `/metrics` from.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        if self.nodes.is_empty() {
            vec![self.addr]
        } else {
            self.nodes.iter().map(|n| n.addr).collect()
        }
    }
}

/// A relay this harness started; stopped (SIGTERM, then kill) when dropped.
pub struct Spawned {
    pub child: Child,
    pub log_path: PathBuf,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        sys::terminate(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The repository root: the parent of this crate's directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| ".".into())
}

fn free_loopback_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a probe socket")?;
    Ok(l.local_addr()?.port())
}

/// Starts a relay on a free loopback port and waits for its `listening on` line.
pub fn spawn(
    kind: RelayKind,
    bin: Option<&Path>,
    extra_env: &[(String, String)],
) -> anyhow::Result<(Spawned, Target)> {
    let root = repo_root();
    let port = free_loopback_port()?;
    let mut cmd = match kind {
        RelayKind::Roomcast => {
            let bin = bin
                .map(Path::to_path_buf)
                .unwrap_or_else(|| root.join("target/release/roomcast"));
            if !bin.exists() {
                bail!(
                    "{} not found: build it with `cargo build --release --bin roomcast` (or pass --relay-bin)",
                    bin.display()
                );
            }
            Command::new(bin)
        }
        RelayKind::Node => {
            let dir = root.join("loadtest/baselines/node-ws");
            if !dir.join("node_modules/ws").exists() {
                bail!(
                    "{}/node_modules missing: run `npm ci --prefix {}`",
                    dir.display(),
                    dir.display()
                );
            }
            let mut c = Command::new(bin.map(Path::to_path_buf).unwrap_or_else(|| "node".into()));
            c.arg(dir.join("server.js"));
            c
        }
    };
    let origin = format!("http://127.0.0.1:{port}");
    // Load-friendly settings: nobody should hit the per-connection rate limit in a load run,
    // and the connection cap is the process's open-file limit less a margin (which the harness
    // raised for itself; the child inherits it).
    let nofile = sys::raise_nofile_limit();
    let env: Vec<(String, String)> = vec![
        ("HOST".into(), "127.0.0.1".into()),
        ("PORT".into(), port.to_string()),
        ("CHAT_TOKEN".into(), SPAWN_TOKEN.into()),
        ("ALLOWED_ORIGINS".into(), origin.clone()),
        ("RATE_LIMIT".into(), "1000000".into()),
        ("RATE_WINDOW_MS".into(), "1000".into()),
        (
            "MAX_CONNECTIONS".into(),
            nofile.saturating_sub(100).to_string(),
        ),
        ("RUST_LOG".into(), "warn".into()),
        // No load balancer to wait for: a stopped run's relay closes at once.
        ("LAME_DUCK_MS".into(), "0".into()),
        // The harness measures how fast the relay takes handshakes (`handshake`) and opens
        // connections at its own pace; the storm scenario sets the limit it measures.
        ("MAX_HANDSHAKES_PER_SECOND".into(), "0".into()),
    ];
    for (k, v) in env.iter().chain(extra_env.iter()) {
        cmd.env(k, v);
    }
    let log_path = std::env::temp_dir().join(format!("roomcast-load-{}-{}.log", kind.name(), port));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .stdin(Stdio::null());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", kind.name()))?;
    let stdout = child.stdout.take().expect("stdout was piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut first = String::new();
        let _ = r.read_line(&mut first);
        let _ = tx.send(first);
        // Keep draining so the relay never blocks on a full pipe.
        let mut sink = [0u8; 4096];
        while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
    });
    let spawned = Spawned { child, log_path };
    let first = rx.recv_timeout(Duration::from_secs(30)).map_err(|_| {
        anyhow!(
            "{} printed no first line within 30 s (log: {})",
            kind.name(),
            spawned.log_path.display()
        )
    })?;
    let addr = parse_listening_line(&first).ok_or_else(|| {
        anyhow!(
            "{} first line was {:?}, expected `... listening on http://HOST:PORT ...` (log: {})",
            kind.name(),
            first.trim(),
            spawned.log_path.display()
        )
    })?;
    let target = Target {
        name: kind.name().into(),
        addr,
        host_header: format!("127.0.0.1:{}", addr.port()),
        path: "/chat".into(),
        token: SPAWN_TOKEN.into(),
        origin,
        pid: Some(spawned.child.id()),
        tls: None,
        nodes: Vec::new(),
        backing: Vec::new(),
    };
    Ok((spawned, target))
}

/// Reads `... listening on http://HOST:PORT ...` (roomcast's and the baseline's first line).
pub fn parse_listening_line(line: &str) -> Option<SocketAddr> {
    let at = line.find("listening on http://")? + "listening on http://".len();
    let rest = &line[at..];
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '/')
        .unwrap_or(rest.len());
    rest[..end].to_socket_addrs().ok()?.next()
}

/// Where `--url` points and what the operator allowed.
pub struct UrlTarget<'a> {
    pub url: &'a str,
    pub token: &'a str,
    pub origin: Option<&'a str>,
    pub pid: Option<u32>,
    /// `--i-own-the-target`: a non-loopback target is allowed.
    pub owned: bool,
    /// `--ca-file`: extra certificates to trust for `wss://`.
    pub ca_file: Option<&'a Path>,
}

/// A target from `--url ws[s]://HOST[:PORT]/PATH`: a loopback address, or anywhere with
/// `--i-own-the-target`.
pub fn from_url(u: &UrlTarget<'_>) -> anyhow::Result<Target> {
    let (tls, rest) = match (u.url.strip_prefix("ws://"), u.url.strip_prefix("wss://")) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => bail!("--url must start with ws:// or wss:// (got {})", u.url),
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/chat"),
    };
    let path = path.split('?').next().unwrap_or("/chat").to_owned();
    let default_port = if tls { 443 } else { 80 };
    let with_port = if hostport
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !hostport.ends_with(']')
    {
        hostport.to_owned()
    } else {
        format!("{hostport}:{default_port}")
    };
    let addrs: Vec<SocketAddr> = with_port
        .to_socket_addrs()
        .with_context(|| format!("resolving {hostport}"))?
        .collect();
    let loopback = addrs.iter().find(|a| a.ip().is_loopback()).copied();
    let addr = match (loopback, u.owned) {
        (Some(addr), _) => addr,
        (None, true) => *addrs
            .first()
            .ok_or_else(|| anyhow!("{hostport} resolves to no address"))?,
        (None, false) => bail!(
            "{hostport} is not a loopback address. roomcast-load puts heavy load on its target: \
             pass --i-own-the-target only for a relay (and load balancer) that you run, such as \
             your own staging deployment"
        ),
    };
    // What listens on a wss:// port is a TLS terminator (roomcast has no TLS), and a remote
    // process cannot be measured: only --pid names the relay then.
    let pid = if addr.ip().is_loopback() && !tls {
        u.pid.or_else(|| sys::pid_listening_on(addr.port()))
    } else {
        u.pid
    };
    let host = hostport
        .rsplit_once(':')
        .filter(|(_, p)| p.parse::<u16>().is_ok() && !hostport.ends_with(']'))
        .map_or(hostport, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let origin = match u.origin {
        Some(o) => o.to_owned(),
        None if addr.ip().is_loopback() && !tls => format!("http://127.0.0.1:{}", addr.port()),
        None => format!("{}://{hostport}", if tls { "https" } else { "http" }),
    };
    Ok(Target {
        name: "relay".into(),
        addr,
        host_header: hostport.to_owned(),
        path,
        token: u.token.to_owned(),
        origin,
        pid,
        tls: tls.then(|| TlsPlan {
            server_name: host,
            ca_file: u.ca_file.map(Path::to_path_buf),
        }),
        nodes: Vec::new(),
        backing: Vec::new(),
    })
}

/// One plain HTTP GET against the relay; the body, or None on any failure.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).ok()?;
    let text = String::from_utf8_lossy(&body).into_owned();
    if !text.starts_with("HTTP/1.1 200") && !text.starts_with("HTTP/1.0 200") {
        return None;
    }
    let at = text.find("\r\n\r\n")? + 4;
    let mut out = text[at..].to_owned();
    if text[..at]
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        out = dechunk(&out);
    }
    Some(out)
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("\r\n") {
        let Ok(n) = usize::from_str_radix(rest[..i].trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < i + 2 + n {
            break;
        }
        out.push_str(&rest[i + 2..i + 2 + n]);
        rest = rest[i + 2 + n..].trim_start_matches("\r\n");
    }
    out
}

/// The relay's Prometheus counters we read, summed over labels: None when there is no
/// `/metrics` (the Node baseline has none).
pub fn metrics(addr: SocketAddr) -> Option<BTreeMap<String, f64>> {
    let text = http_get(addr, "/metrics")?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((name_labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = name_labels.split('{').next().unwrap_or(name_labels);
        if let Ok(v) = value.parse::<f64>() {
            *out.entry(name.to_owned()).or_insert(0.0) += v;
            if name_labels.contains('{') && !name.ends_with("_bucket") {
                out.insert(name_labels.to_owned(), v);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str, owned: bool) -> anyhow::Result<Target> {
        from_url(&UrlTarget {
            url,
            token: "t",
            origin: None,
            pid: None,
            owned,
            ca_file: None,
        })
    }

    #[test]
    fn urls_name_the_address_host_origin_and_tls() {
        let t = target("ws://127.0.0.1:9/chat", false).expect("loopback");
        assert_eq!(
            (t.addr.port(), t.origin.as_str()),
            (9, "http://127.0.0.1:9")
        );
        assert!(t.tls.is_none());
        let t = target("wss://localhost:9443/rc/chat?x=1", false).expect("loopback wss");
        let tls = t.tls.expect("wss speaks TLS");
        assert_eq!(tls.server_name, "localhost");
        assert_eq!(
            (t.path.as_str(), t.origin.as_str()),
            ("/rc/chat", "https://localhost:9443")
        );
        assert_eq!(t.host_header, "localhost:9443");
        let t = target("wss://[::1]/chat", false).expect("loopback v6");
        assert_eq!(t.addr.port(), 443);
        assert_eq!(t.tls.expect("tls").server_name, "::1");
    }

    #[test]
    fn a_target_off_this_machine_needs_the_owners_word() {
        let refused = target("ws://203.0.113.9/chat", false).expect_err("refused");
        assert!(
            refused.to_string().contains("--i-own-the-target"),
            "{refused}"
        );
        let t = target("ws://203.0.113.9/chat", true).expect("owned");
        assert_eq!(t.addr.to_string(), "203.0.113.9:80");
        assert!(
            t.pid.is_none(),
            "a remote relay's process cannot be measured"
        );
        assert_eq!(t.origin, "http://203.0.113.9");
    }
}
