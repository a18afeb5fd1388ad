//! `roomcast-load`: the load harness for roomcast and any relay speaking its compatible contract.
//!
//! Code map: `wire` (the hand-written WebSocket client side), `worker` (a load process: many
//! connections on one thread), `proto` (what the coordinator and workers say), `coord` (starting
//! workers and merging what they measured), `relay` (starting or finding the relay under test,
//! reading its /metrics), `sys` (rlimits, clocks, CPU and memory from /proc), `scenarios` and
//! `floor` (what is measured), `compare` (roomcast and the Node baseline back to back),
//! `report` (the table and the JSON line).

mod cluster;
mod compare;
mod coord;
mod deploy;
mod floor;
mod proto;
mod relay;
mod report;
mod scenarios;
mod sys;
mod tls;
mod wire;
mod worker;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use relay::{RelayKind, Spawned, Target};
use scenarios::*;

#[derive(Debug, Parser)]
#[command(
    name = "roomcast-load",
    version,
    about = "Load harness for roomcast and any relay speaking its compatible WebSocket contract (this machine, or with --i-own-the-target a staging relay of yours)",
    after_help = "Against a relay you started yourself, give it a rate limit nobody reaches, e.g.\n  \
                  RATE_LIMIT=1000000 HOST=127.0.0.1 PORT=8080 target/release/roomcast\n\
                  then: roomcast-load --url ws://127.0.0.1:8080/chat fanout\n\
                  Or let the harness start it: roomcast-load --spawn roomcast fanout"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, clap::Args)]
struct Global {
    /// The relay's WebSocket endpoint: ws:// or wss://, on this machine unless
    /// --i-own-the-target.
    #[arg(long, global = true, default_value = "ws://127.0.0.1:8080/chat")]
    url: String,
    /// Allow a --url that is not on this machine (a staging relay behind its real load
    /// balancer). Say so only for a target you run: the harness puts heavy load on it. Relay
    /// CPU and memory are then not measured.
    #[arg(long = "i-own-the-target", global = true)]
    i_own_the_target: bool,
    /// Extra PEM certificates to trust for a wss:// --url (a private CA).
    #[arg(long, global = true)]
    ca_file: Option<PathBuf>,
    /// Start this relay on a free loopback port with load-friendly settings instead of using --url.
    #[arg(long, global = true, value_enum)]
    spawn: Option<RelayKind>,
    /// Binary (roomcast) or interpreter (node) to use with --spawn.
    #[arg(long, global = true)]
    relay_bin: Option<PathBuf>,
    /// With --spawn roomcast: start this many relay nodes and spread every room's members over
    /// them (see --redis).
    #[arg(long, global = true, default_value_t = 1)]
    nodes: usize,
    /// What spawned nodes share: `single` (one redis-server), `cluster` (3 masters + 3
    /// replicas), `none` [default: none for one node, single for several].
    #[arg(long, global = true, value_enum)]
    redis: Option<deploy::RedisMode>,
    /// Extra KEY=VALUE environment for a spawned relay (repeatable).
    #[arg(long = "relay-env", global = true)]
    relay_env: Vec<String>,
    /// PID of the relay to measure (found from the port when omitted).
    #[arg(long, global = true)]
    pid: Option<u32>,
    /// Token for the upgrade URL (with --spawn: the spawned relay's).
    #[arg(long, global = true, env = "CHAT_TOKEN", default_value = "dev-token")]
    token: String,
    /// Origin header to send [default: http://127.0.0.1:PORT].
    #[arg(long, global = true)]
    origin: Option<String>,
    /// Load processes (0 = as many as the connection count needs, ~19,000 connections each).
    #[arg(long, global = true, default_value_t = 0)]
    procs: usize,
    /// New connections per second while opening.
    #[arg(long, global = true, default_value_t = 2000.0)]
    connect_rate: f64,
    /// Upgrades in flight at once while opening.
    #[arg(long, global = true, default_value_t = 256)]
    connect_in_flight: usize,
    /// Give up on a connection that has not joined after this many ms.
    #[arg(long, global = true, default_value_t = 15_000)]
    connect_timeout_ms: u64,
    /// Also write the final JSON line to this file.
    #[arg(long, global = true)]
    json_out: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Open N idle connections; relay memory per idle connection, connect latency.
    Idle(IdleArgs),
    /// Rooms x members at a fixed publish rate; latency, loss, duplicates, reordering, CPU/delivery.
    Fanout(FanoutArgs),
    /// Ramp the publish rate until deliveries fall under 95% or p99 passes 50 ms.
    Saturate(SaturateArgs),
    /// Connect, first event, close, many times; handshakes per second.
    Handshake(HandshakeArgs),
    /// Waves of connections come and go during a fan-out; does relay memory come back?
    Churn(ChurnArgs),
    /// Members that never read: healthy latency with and without them, how they were closed.
    Slow(SlowArgs),
    /// Attackers flood control frames during a fan-out: victims' latency and loss without and
    /// with them, how the attackers were ended, relay memory and CPU.
    Flood(FloodArgs),
    /// Many idle connections over several nodes (--nodes, --redis): memory summed over the
    /// nodes and Redis, connect latency, one broadcast to every room, idle CPU over a heartbeat.
    Cluster(cluster::ClusterArgs),
    /// A reconnect storm during a fan-out: how long until every storm client is back, and
    /// everyone else's latency before and during it.
    Storm(cluster::StormArgs),
    /// Raw loopback TCP send cost on this machine (no relay involved).
    Floor(floor::FloorArgs),
    /// Run scenarios against roomcast and the Node baseline back to back and print ratios.
    Compare(compare::CompareArgs),
    /// (internal) a load worker process, driven over stdin/stdout.
    #[command(hide = true)]
    Worker,
    /// (internal) the receiving ends of `floor`, driven over stdin/stdout.
    #[command(hide = true)]
    FloorReceiver(floor::ReceiverArgs),
}

fn common(g: &Global) -> Common {
    Common {
        procs: g.procs,
        connect_rate: g.connect_rate,
        connect_in_flight: g.connect_in_flight,
        connect_timeout_ms: g.connect_timeout_ms,
    }
}

fn relay_env(g: &Global) -> anyhow::Result<Vec<(String, String)>> {
    g.relay_env
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| anyhow::anyhow!("--relay-env wants KEY=VALUE, got {kv}"))
        })
        .collect()
}

/// What a run started (stopped when dropped).
enum Started {
    One(#[allow(dead_code)] Spawned),
    Many(#[allow(dead_code)] deploy::Deployment),
}

fn target(g: &Global) -> anyhow::Result<(Option<Started>, Target)> {
    let redis = g.redis.unwrap_or(if g.nodes > 1 {
        deploy::RedisMode::Single
    } else {
        deploy::RedisMode::None
    });
    let many = g.nodes > 1 || redis != deploy::RedisMode::None;
    match g.spawn {
        Some(RelayKind::Roomcast) if many => {
            let (d, t) = deploy::spawn(g.relay_bin.as_deref(), g.nodes, redis, &relay_env(g)?)?;
            Ok((Some(Started::Many(d)), t))
        }
        _ if many => anyhow::bail!("--nodes and --redis need --spawn roomcast"),
        Some(kind) => {
            let (s, t) = relay::spawn(kind, g.relay_bin.as_deref(), &relay_env(g)?)?;
            eprintln!(
                "started {} (pid {}) on {}; log {}",
                t.name,
                s.child.id(),
                t.addr,
                s.log_path.display()
            );
            Ok((Some(Started::One(s)), t))
        }
        None => {
            let t = relay::from_url(&relay::UrlTarget {
                url: &g.url,
                token: &g.token,
                origin: g.origin.as_deref(),
                pid: g.pid,
                owned: g.i_own_the_target,
                ca_file: g.ca_file.as_deref(),
            })?;
            eprintln!(
                "target {} (pid {}); the relay must allow Origin {} and have a high RATE_LIMIT for publishing scenarios",
                t.addr,
                t.pid.map(|p| p.to_string()).unwrap_or_else(|| "unknown".into()),
                t.origin
            );
            Ok((None, t))
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Cmd::Worker = cli.command {
        return worker::main();
    }
    if let Cmd::FloorReceiver(a) = &cli.command {
        return floor::receiver_main(a);
    }
    let limit = sys::raise_nofile_limit();
    eprintln!("open-file limit raised to {limit}");
    let g = &cli.global;
    let c = common(g);
    let mut report = match &cli.command {
        Cmd::Floor(a) => floor::floor(a)?,
        Cmd::Compare(a) => {
            compare::run(a, &c, g.relay_bin.as_deref())?;
            return Ok(());
        }
        Cmd::Worker | Cmd::FloorReceiver(_) => unreachable!("handled above"),
        cmd => {
            let (_spawned, t) = target(g)?;
            match cmd {
                Cmd::Idle(a) => idle(&t, &c, a)?,
                Cmd::Fanout(a) => fanout(&t, &c, a)?,
                Cmd::Saturate(a) => saturate(&t, &c, a)?,
                Cmd::Handshake(a) => handshake(&t, &c, a)?,
                Cmd::Churn(a) => churn(&t, &c, a)?,
                Cmd::Slow(a) => slow(&t, &c, a)?,
                Cmd::Flood(a) => flood(&t, &c, a)?,
                Cmd::Cluster(a) => cluster::cluster(&t, &c, a)?,
                Cmd::Storm(a) => cluster::storm(&t, &c, a)?,
                _ => unreachable!("other commands handled above"),
            }
        }
    };
    let v = report.print();
    if let Some(path) = &g.json_out {
        std::fs::write(path, format!("{}\n", serde_json::to_string(&v)?))?;
    }
    Ok(())
}
