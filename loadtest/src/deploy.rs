//! A multi-node deployment on this machine for `--nodes N` (with `--spawn roomcast`): N relay
//! processes sharing one `redis-server` (`--redis single`) or a Redis Cluster of three masters
//! and three replicas (`--redis cluster`), every process on free loopback ports, stopped when the
//! run ends. The harness connects to the nodes directly (no load balancer: one nginx process
//! could not carry 100,000 proxied connections under this machine's 20,000 open files per
//! process), spreading every room's members over every node.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use crate::relay::{self, Backing, Node, RelayKind, Spawned, Target};
use crate::sys;

/// What the relay nodes share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RedisMode {
    /// No Redis: with several nodes, a room split over two nodes is two rooms (only for
    /// measuring the relays alone).
    None,
    /// One `redis-server` (`REDIS_URL`).
    Single,
    /// Three masters and three replicas (`REDIS_CLUSTER_NODES`).
    Cluster,
}

/// The Origin every node allows and the harness sends.
pub const ORIGIN: &str = "http://roomcast.load";

/// Everything a multi-node run started; stopped in reverse order when dropped.
pub struct Deployment {
    _relays: Vec<Spawned>,
    redis: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Deployment {
    fn drop(&mut self) {
        // The relays go first (their `Spawned` drops after this body), then Redis: stopping
        // Redis under live relays would only log reconnect attempts.
        self._relays.clear();
        for c in &mut self.redis {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a probe socket")?;
    Ok(l.local_addr()?.port())
}

/// `redis-cli -p PORT ARGS...`, its output; None if it failed.
pub fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A field of `INFO` output (`used_memory`, `master_link_status`, ...).
pub fn info_field(info: &str, field: &str) -> Option<String> {
    info.lines()
        .find_map(|l| l.trim().strip_prefix(field)?.strip_prefix(':'))
        .map(str::to_owned)
}

fn start_redis(dir: &Path, port: u16, extra: &[String]) -> anyhow::Result<Child> {
    let node_dir = dir.join(format!("redis-{port}"));
    std::fs::create_dir_all(&node_dir)?;
    let log = std::fs::File::create(node_dir.join("redis.log"))?;
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(&node_dir)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()
        .context("starting redis-server (apt-get install redis-server)")
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !ok() {
        if Instant::now() > deadline {
            bail!("{what} within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The Redis servers of a deployment: the processes, their ports, and the relays' settings.
type Started = (Vec<Child>, Vec<u16>, Vec<(String, String)>);

/// Starts Redis as `mode` says.
fn start_backing(dir: &Path, mode: RedisMode) -> anyhow::Result<Started> {
    match mode {
        RedisMode::None => Ok((Vec::new(), Vec::new(), Vec::new())),
        RedisMode::Single => {
            let port = free_port()?;
            let child = start_redis(dir, port, &[])?;
            wait_for(
                "redis-server did not answer",
                Duration::from_secs(10),
                || redis_cli(port, &["ping"]).is_some_and(|r| r.trim() == "PONG"),
            )?;
            let env = vec![("REDIS_URL".into(), format!("redis://127.0.0.1:{port}"))];
            Ok((vec![child], vec![port], env))
        }
        RedisMode::Cluster => {
            // docs/DEPLOY.md's settings (FACTS.md: without the validity factor and the sync
            // delay a replica may refuse to take over).
            let mut children = Vec::new();
            let mut ports = Vec::new();
            for _ in 0..6 {
                let (port, bus) = (free_port()?, free_port()?);
                let extra: Vec<String> = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus.to_string(),
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
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
                children.push(start_redis(dir, port, &extra)?);
                ports.push(port);
            }
            for &p in &ports {
                wait_for(
                    "a cluster redis-server did not answer",
                    Duration::from_secs(10),
                    || redis_cli(p, &["ping"]).is_some_and(|r| r.trim() == "PONG"),
                )?;
            }
            let mut create = Command::new("redis-cli");
            create.args(["--cluster", "create"]);
            for p in &ports {
                create.arg(format!("127.0.0.1:{p}"));
            }
            let out = create
                .args(["--cluster-replicas", "1", "--cluster-yes"])
                .stdin(Stdio::null())
                .output()
                .context("running redis-cli --cluster create")?;
            if !out.status.success() {
                bail!(
                    "redis-cli --cluster create failed: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
            wait_for(
                "the Redis Cluster did not form",
                Duration::from_secs(30),
                || {
                    ports.iter().all(|&p| {
                        redis_cli(p, &["cluster", "info"]).is_some_and(|i| {
                            info_field(&i, "cluster_state").as_deref() == Some("ok")
                        })
                    }) && ports.iter().all(|&p| {
                        redis_cli(p, &["info", "replication"]).is_some_and(|i| {
                            info_field(&i, "role").as_deref() == Some("master")
                                || info_field(&i, "master_link_status").as_deref() == Some("up")
                        })
                    })
                },
            )?;
            let seeds = ports
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(",");
            Ok((children, ports, vec![("REDIS_CLUSTER_NODES".into(), seeds)]))
        }
    }
}

/// Starts Redis as `mode` says and `nodes` roomcast relays using it, each with the load
/// settings of `relay::spawn` plus `extra_env`; the target lists every node.
pub fn spawn(
    bin: Option<&Path>,
    nodes: usize,
    mode: RedisMode,
    extra_env: &[(String, String)],
) -> anyhow::Result<(Deployment, Target)> {
    if nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let dir = std::env::temp_dir().join(format!("roomcast-load-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (redis, ports, mut env) = start_backing(&dir, mode)?;
    let mut deployment = Deployment {
        _relays: Vec::new(),
        redis,
        dir,
    };
    env.push(("ALLOWED_ORIGINS".into(), ORIGIN.into()));
    env.extend(extra_env.iter().cloned());
    let mut target: Option<Target> = None;
    let mut list = Vec::new();
    for i in 0..nodes {
        let (s, t) = relay::spawn(RelayKind::Roomcast, bin, &env)
            .with_context(|| format!("starting relay node {}", i + 1))?;
        eprintln!(
            "node {} (pid {}) on {}; log {}",
            i + 1,
            s.child.id(),
            t.addr,
            s.log_path.display()
        );
        list.push(Node {
            addr: t.addr,
            pid: t.pid,
        });
        deployment._relays.push(s);
        target.get_or_insert(t);
    }
    let mut t = target.ok_or_else(|| anyhow!("no node started"))?;
    t.name = format!("roomcast x{nodes}");
    t.origin = ORIGIN.into();
    t.nodes = list;
    t.backing = ports
        .iter()
        .zip(&deployment.redis)
        .map(|(&port, c)| Backing { port, pid: c.id() })
        .collect();
    if mode == RedisMode::Single || mode == RedisMode::Cluster {
        eprintln!(
            "redis ({mode:?}) on ports {}",
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    let _ = sys::raise_nofile_limit();
    Ok((deployment, t))
}

/// Redis's own memory figure (`used_memory`, bytes), summed over the servers.
pub fn redis_used_memory(target: &Target) -> Option<u64> {
    let mut total = 0;
    for b in &target.backing {
        let info = redis_cli(b.port, &["info", "memory"])?;
        total += info_field(&info, "used_memory")?
            .trim()
            .parse::<u64>()
            .ok()?;
    }
    (!target.backing.is_empty()).then_some(total)
}
