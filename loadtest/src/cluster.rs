//! Scenarios for a deployment of several nodes (`--nodes N --redis single|cluster`, see
//! `deploy`), though both run against one relay too:
//!
//! - `cluster`: many idle connections spread over the nodes (every room on every node): relay
//!   memory summed over the nodes, Redis's memory, connect → history latency, the time for one
//!   message in every room to reach every member, and the CPU of the idle deployment over one
//!   heartbeat interval.
//! - `storm`: a fan-out runs while a crowd of clients reconnects at once, as after a node
//!   restart, retrying refusals with the bundled JS client's backoff: how long until all are
//!   back, and the fan-out's latency before and during the storm.
//!
//! Every wait is bounded in time.

use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;

use crate::coord::{Stormed, Workers};
use crate::deploy;
use crate::proto::*;
use crate::relay::Target;
use crate::report::{spend, RelayPoint, Report};
use crate::scenarios::*;
use crate::sys;

#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Connections to open, spread over the nodes.
    #[arg(long, default_value_t = 2000)]
    pub conns: u32,
    /// Rooms they are spread over; each room's first member publishes the broadcast.
    #[arg(long, default_value_t = 100)]
    pub rooms: u32,
    /// How long to measure the idle deployment's CPU (ms): one heartbeat interval (the relay's
    /// HEARTBEAT_MS, 30,000 by default).
    #[arg(long, default_value_t = 30_000)]
    pub idle_ms: u64,
    /// Longest wait for the broadcast to arrive everywhere (ms).
    #[arg(long, default_value_t = 30_000)]
    pub broadcast_timeout_ms: u64,
    /// Characters of text in the broadcast message.
    #[arg(long, default_value_t = 64)]
    pub text_bytes: usize,
    /// Longest wait for presence traffic to stop after the last connection joined (ms).
    #[arg(long, default_value_t = 60_000)]
    pub settle_max_ms: u64,
}

#[derive(Debug, Clone, Args)]
pub struct StormArgs {
    /// Rooms of the fan-out that runs throughout ("everyone else").
    #[arg(long, default_value_t = 20)]
    pub rooms: u32,
    /// Members per fan-out room, the publisher included.
    #[arg(long, default_value_t = 50)]
    pub members: u32,
    /// Fan-out messages per second in total (deliveries/s = rate x members).
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Length of the baseline phase before the storm (ms).
    #[arg(long, default_value_t = 10_000)]
    pub baseline_ms: u64,
    /// Clients that reconnect at once.
    #[arg(long, default_value_t = 2_000)]
    pub storm: u32,
    /// Rooms the storm clients join (not the fan-out's): each greets its joiners with history.
    #[arg(long, default_value_t = 1_000)]
    pub storm_rooms: u32,
    /// Upgrades the storm's load processes keep under way at once, in all.
    #[arg(long, default_value_t = 4_096)]
    pub storm_in_flight: usize,
    /// The JS client's backoff: the first attempt within this many ms, the k-th retry within
    /// min(retry-max-ms, retry-base-ms x 2^k), uniformly at random.
    #[arg(long, default_value_t = 500)]
    pub retry_base_ms: u64,
    #[arg(long, default_value_t = 10_000)]
    pub retry_max_ms: u64,
    /// A storm client still not back after this long gives up (ms).
    #[arg(long, default_value_t = 120_000)]
    pub storm_deadline_ms: u64,
    /// Characters of text per fan-out message.
    #[arg(long, default_value_t = 64)]
    pub text_bytes: usize,
}

/// Per-node RSS (KiB), in node order, for the report.
fn node_rss_kb(target: &Target) -> Vec<Option<u64>> {
    target
        .pids()
        .iter()
        .map(|&p| sys::sample_process(p).map(|s| s.rss_kb))
        .collect()
}

pub fn cluster(target: &Target, c: &Common, a: &ClusterArgs) -> anyhow::Result<Report> {
    let mut r = Report::new("cluster", target);
    need_pid(&mut r, target);
    let per_room = a.conns.div_ceil(a.rooms.max(1));
    let specs: Vec<ConnSpec> = layout(a.rooms, per_room, 1, 0, 0)
        .into_iter()
        .take(a.conns as usize)
        .collect();
    let mut w = Workers::start(target, &specs, c.procs, None)?;
    std::thread::sleep(Duration::from_millis(300));
    let before = RelayPoint::take(target, false);
    let redis_before = deploy::redis_used_memory(target);
    let conn = w.connect(&[Role::Member], c)?;
    eprintln!(
        "cluster: {} of {} joined over {} node(s); waiting for presence traffic to settle",
        conn.ok,
        specs.len(),
        target.nodes.len().max(1)
    );
    let settled = w.settle(
        Duration::from_millis(1500),
        Duration::from_millis(a.settle_max_ms),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let after = RelayPoint::take(target, false);
    let redis_after = deploy::redis_used_memory(target);
    r.int("procs", "load processes", w.len() as u64);
    r.int("rooms", "rooms", a.rooms as u64);
    put_connect(&mut r, &conn, specs.len() as u64);
    r.counts(
        "ended_by_relay",
        "connections ended by relay",
        &settled.ended,
    );
    put_idle_memory(&mut r, &before, &after, conn.ok);
    r.put(
        "node_rss_kb",
        "relay RSS per node (KiB)",
        json!(node_rss_kb(target)),
    );
    r.opt(
        "redis_used_memory_bytes",
        "Redis used_memory, all servers (bytes)",
        redis_after.map(|v| v as f64),
    );
    r.opt(
        "redis_used_memory_growth_bytes",
        "Redis used_memory growth while connecting (bytes)",
        redis_before
            .zip(redis_after)
            .map(|(b, x)| x as f64 - b as f64),
    );
    r.opt(
        "redis_rss_kb",
        "Redis RSS, all servers (KiB)",
        after.backing.map(|b| b.rss_kb as f64),
    );

    // Idle: the deployment's CPU over one heartbeat interval, every connection answering pings.
    eprintln!(
        "cluster: measuring idle CPU for {} s (one heartbeat interval)",
        a.idle_ms / 1000
    );
    let i0 = RelayPoint::take(target, false);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(a.idle_ms));
    let i1 = RelayPoint::take(target, false);
    let idle_s = t0.elapsed().as_secs_f64();
    let sp = spend(&i0, &i1);
    r.num("idle_s", "idle measurement (s)", idle_s);
    r.opt(
        "idle_relay_cpu_s",
        "idle relay CPU, all nodes (s)",
        sp.cpu_us.map(|u| u as f64 / 1e6),
    );
    r.opt(
        "idle_relay_core_share",
        "idle relay CPU, all nodes (share of one core)",
        sp.cpu_us.map(|u| u as f64 / 1e6 / idle_s),
    );
    r.opt(
        "idle_redis_core_share",
        "idle Redis CPU, all servers (share of one core)",
        sp.backing_cpu_us.map(|u| u as f64 / 1e6 / idle_s),
    );

    // One message in every room, at once; until every member has it.
    w.reset()?;
    let b0 = RelayPoint::take(target, false);
    let (sent, first_ns) = w.broadcast(a.text_bytes)?;
    let expected: u64 = conn.ok; // every member of every room, publishers included
    let deadline = Instant::now() + Duration::from_millis(a.broadcast_timeout_ms);
    let mut s = w.report()?;
    while s.deliveries < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        s = w.report()?;
    }
    let b1 = RelayPoint::take(target, false);
    r.int("broadcast_messages", "broadcast: messages sent", sent);
    r.int(
        "broadcast_expected",
        "broadcast: deliveries expected",
        expected,
    );
    r.int(
        "broadcast_deliveries",
        "broadcast: deliveries",
        s.deliveries,
    );
    r.int(
        "broadcast_duplicates",
        "broadcast: duplicates",
        s.duplicates,
    );
    r.opt(
        "broadcast_all_ms",
        "broadcast: first send -> last delivery (ms)",
        (s.last_delivery_ns > first_ns && first_ns != u64::MAX)
            .then(|| (s.last_delivery_ns - first_ns) as f64 / 1e6),
    );
    r.latency(
        "broadcast_latency",
        "broadcast: latency per delivery",
        &s.latency,
    );
    r.opt(
        "broadcast_relay_cpu_s",
        "broadcast: relay CPU, all nodes (s)",
        spend(&b0, &b1).cpu_us.map(|u| u as f64 / 1e6),
    );
    if s.deliveries < expected {
        r.note(format!(
            "the broadcast reached {} of {} within {} ms",
            s.deliveries, expected, a.broadcast_timeout_ms
        ));
    }
    let (closed, forced) = w.close(&[Role::Member], 20_000)?;
    r.int("closed", "closed by client", closed);
    r.int("close_forced", "closes forced (no close handshake)", forced);
    Ok(r)
}

pub fn storm(target: &Target, c: &Common, a: &StormArgs) -> anyhow::Result<Report> {
    let mut r = Report::new("storm", target);
    need_pid(&mut r, target);
    let specs = layout(a.rooms, a.members, 1, 0, 0);
    let base = specs.len() as u32;
    let storm_specs = extra_conns(base, a.storm, Role::Churn, |i| {
        a.rooms + i % a.storm_rooms.max(1)
    });
    let mut w = Workers::start(target, &specs, c.procs, None)?;
    // The storm in load processes of its own, so its connect work does not delay the
    // timestamps of the fan-out's deliveries.
    let mut sw = Workers::start(target, &storm_specs, 0, None)?;
    let conn = w.connect(&[Role::Member], c)?;
    w.settle(Duration::from_millis(1000), Duration::from_secs(30))?;
    let pubs = publishers_per_worker(&specs, &w);
    eprintln!(
        "storm: phase 1 (baseline), {} members, {} msg/s for {} ms",
        conn.ok, a.rate, a.baseline_ms
    );
    let baseline = run_phase(
        target,
        &mut w,
        &pubs,
        a.rate,
        a.baseline_ms,
        a.text_bytes,
        a.members as u64,
    )?;
    eprintln!(
        "storm: phase 2, {} clients reconnect at once during the fan-out",
        a.storm
    );
    let m0 = RelayPoint::take(target, true);
    let retry = Retry {
        base_ms: a.retry_base_ms,
        max_ms: a.retry_max_ms,
        deadline_ms: a.storm_deadline_ms,
    };
    let mut stormed: Option<Stormed> = None;
    let during = run_phase_with(
        target,
        &mut w,
        &pubs,
        a.rate,
        a.storm_deadline_ms + c.connect_timeout_ms + 5_000,
        a.text_bytes,
        a.members as u64,
        || {
            sw.storm_start(
                &[Role::Churn],
                a.storm_in_flight,
                c.connect_timeout_ms,
                retry,
            )?;
            stormed = Some(sw.storm_wait()?);
            Ok(true)
        },
    )?;
    let m1 = RelayPoint::take(target, true);
    let st = stormed.expect("the storm ran");
    r.int("procs", "load processes (fan-out)", w.len() as u64);
    r.int("storm_procs", "load processes (storm)", sw.len() as u64);
    r.put(
        "shape",
        "shape",
        json!(format!(
            "fan-out {} rooms x {} members at {} msg/s; storm of {} over {} rooms",
            a.rooms, a.members, a.rate, a.storm, a.storm_rooms
        )),
    );
    put_connect(&mut r, &conn, specs.len() as u64);
    put_phase(&mut r, "baseline_", &baseline);
    put_phase(&mut r, "storm_", &during);
    r.int("storm_clients", "storm: clients", a.storm as u64);
    r.int("storm_back", "storm: clients back", st.connected.ok);
    r.counts(
        "storm_gave_up",
        "storm: clients that gave up",
        &st.connected.failed,
    );
    r.int("storm_attempts", "storm: upgrade attempts", st.attempts);
    r.counts(
        "storm_retried",
        "storm: failed attempts, retried",
        &st.retried,
    );
    r.num(
        "storm_all_back_s",
        "storm: until the last client was back (s)",
        st.back.max() as f64 / 1e6,
    );
    r.latency("storm_back", "storm: start -> back, per client", &st.back);
    r.latency(
        "storm_attempt_latency",
        "storm: connect -> history of the attempt that joined",
        &st.connected.latency,
    );
    let mut refusals = std::collections::BTreeMap::new();
    if let (Some(x), Some(y)) = (&m0.metrics, &m1.metrics) {
        for (k, v) in y {
            if let Some(reason) = k
                .strip_prefix("roomcast_upgrade_rejections_total{reason=\"")
                .and_then(|rest| rest.strip_suffix("\"}"))
            {
                let d = v - x.get(k).copied().unwrap_or(0.0);
                if d > 0.0 {
                    refusals.insert(reason.to_owned(), d as u64);
                }
            }
        }
    }
    r.counts(
        "storm_relay_refusals",
        "storm: upgrades the relays refused (metric)",
        &refusals,
    );
    sw.close(&[Role::Churn], 20_000)?;
    w.close(&[Role::Member], 10_000)?;
    Ok(r)
}
