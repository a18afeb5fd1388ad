//! The load scenarios of issue 3 (idle, fanout, saturate, handshake, churn, slow) and flood
//! (control-frame floods against a fan-out). Each lays out
//! its connections, drives the workers through phases, reads the relay's CPU and memory around
//! the phase that matters, and returns a `Report`. Every loop here is bounded in count and time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::coord::{merge_counts, merge_hist, Workers};
use crate::proto::*;
use crate::relay::Target;
use crate::report::{spend, RelayPoint, Report};
use crate::sys;
use crate::worker::new_histogram;

/// Settings every scenario shares.
#[derive(Debug, Clone)]
pub struct Common {
    pub procs: usize,
    /// New connections per second while opening.
    pub connect_rate: f64,
    /// Upgrades in flight at once while opening (kept under the relay's accept backlog).
    pub connect_in_flight: usize,
    pub connect_timeout_ms: u64,
}

#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    /// Connections to open.
    #[arg(long, default_value_t = 2000)]
    pub conns: u32,
    /// Rooms they are spread over.
    #[arg(long, default_value_t = 100)]
    pub rooms: u32,
    /// Longest wait for presence traffic to stop after the last connection joined (ms).
    #[arg(long, default_value_t = 30_000)]
    pub settle_max_ms: u64,
}

#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    /// Rooms the members are spread over.
    #[arg(long, default_value_t = 20)]
    pub rooms: u32,
    /// Connections per room, publishers included.
    #[arg(long, default_value_t = 50)]
    pub members: u32,
    /// Publishers per room.
    #[arg(long, default_value_t = 1)]
    pub publishers: u32,
    /// Messages per second published in total (deliveries/s = rate x members).
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// How long to publish (ms).
    #[arg(long, default_value_t = 10_000)]
    pub duration_ms: u64,
    /// Characters of text per message (at most the relay's MAX_TEXT_CHARS).
    #[arg(long, default_value_t = 64)]
    pub text_bytes: usize,
}

#[derive(Debug, Clone, Args)]
pub struct SaturateArgs {
    /// Rooms the members are spread over.
    #[arg(long, default_value_t = 20)]
    pub rooms: u32,
    /// Connections per room, publishers included.
    #[arg(long, default_value_t = 50)]
    pub members: u32,
    /// Publishers per room.
    #[arg(long, default_value_t = 1)]
    pub publishers: u32,
    /// First offered rate, messages per second.
    #[arg(long, default_value_t = 200.0)]
    pub start_rate: f64,
    /// Each step offers this many times the previous rate.
    #[arg(long, default_value_t = 1.25)]
    pub factor: f64,
    /// Length of each step (ms).
    #[arg(long, default_value_t = 5_000)]
    pub step_ms: u64,
    /// Most steps before giving up on finding the limit.
    #[arg(long, default_value_t = 16)]
    pub max_steps: u32,
    /// A step passes while at least this share of deliveries arrive...
    #[arg(long, default_value_t = 0.95)]
    pub min_delivered: f64,
    /// ...and p99 latency stays at or under this (ms).
    #[arg(long, default_value_t = 50.0)]
    pub max_p99_ms: f64,
    /// Characters of text per message (at most the relay's MAX_TEXT_CHARS).
    #[arg(long, default_value_t = 64)]
    pub text_bytes: usize,
}

#[derive(Debug, Clone, Args)]
pub struct HandshakeArgs {
    /// Handshakes in total.
    #[arg(long, default_value_t = 5000)]
    pub count: u64,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
}

#[derive(Debug, Clone, Args)]
pub struct ChurnArgs {
    /// Rooms the members are spread over.
    #[arg(long, default_value_t = 10)]
    pub rooms: u32,
    /// Steady members per room (they chat during the waves).
    #[arg(long, default_value_t = 50)]
    pub members: u32,
    /// Connections that join and leave in each wave, spread over the same rooms.
    #[arg(long, default_value_t = 1000)]
    pub wave_conns: u32,
    /// Waves of connections that join and leave.
    #[arg(long, default_value_t = 20)]
    pub waves: u32,
    /// How long each wave stays connected (ms).
    #[arg(long, default_value_t = 500)]
    pub hold_ms: u64,
    /// Messages per second from the steady members during the waves.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Characters of text per message (at most the relay's MAX_TEXT_CHARS).
    #[arg(long, default_value_t = 64)]
    pub text_bytes: usize,
    /// Messages each room's history holds (the relay's HISTORY_LIMIT): the steady reference is
    /// taken once every room's history is full, after 1.5 times the time that takes at `rate`.
    #[arg(long, default_value_t = 50)]
    pub history: u32,
}

#[derive(Debug, Clone, Args)]
pub struct SlowArgs {
    /// Rooms the members are spread over.
    #[arg(long, default_value_t = 1)]
    pub rooms: u32,
    /// Healthy members per room (they read everything).
    #[arg(long, default_value_t = 100)]
    pub members: u32,
    /// Members per room that never read.
    #[arg(long, default_value_t = 10)]
    pub slow: u32,
    /// Messages per second in total.
    #[arg(long, default_value_t = 400.0)]
    pub rate: f64,
    /// Length of each phase, without and with the slow members (ms). Long enough for a slow
    /// member to be offered more than loopback's kernel buffers hold (measured ~2.3 MB per
    /// socket here) plus the relay's outbox (256 KiB): 400 msgs/s of ~600 B for 20 s is ~4.8 MB.
    #[arg(long, default_value_t = 20_000)]
    pub duration_ms: u64,
    /// Large messages fill a slow member's queue sooner.
    #[arg(long, default_value_t = 480)]
    pub text_bytes: usize,
    /// Receive buffer of the slow sockets (bytes), so they back up quickly.
    #[arg(long, default_value_t = 4096)]
    pub slow_rcvbuf: u32,
}

#[derive(Debug, Clone, Args)]
pub struct FloodArgs {
    /// Rooms the members are spread over.
    #[arg(long, default_value_t = 10)]
    pub rooms: u32,
    /// Victims per room (one of them publishes); they read everything.
    #[arg(long, default_value_t = 20)]
    pub members: u32,
    /// Messages per second in total from the victims.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Length of each phase, baseline and then attack (ms).
    #[arg(long, default_value_t = 10_000)]
    pub duration_ms: u64,
    /// Characters of text per message (at most the relay's MAX_TEXT_CHARS).
    #[arg(long, default_value_t = 64)]
    pub text_bytes: usize,
    /// Attacking connections, each in a room of its own, in a load process of their own.
    #[arg(long, default_value_t = 4)]
    pub attackers: u32,
    /// What the attackers write as fast as they can during the attack phase.
    #[arg(long, value_enum, default_value_t = AttackKind::Ping)]
    pub kind: AttackKind,
    /// How the attackers read while they flood: `slow` (4 KiB every 100 ms) or `none`.
    #[arg(long, value_enum, default_value_t = AttackReads::None)]
    pub attacker_reads: AttackReads,
}

/// Lays out `rooms x members` connections: member m of room r is connection `m * rooms + r`
/// (so every worker gets a share of every room); the first `publishers` members of a room
/// publish; the last `slow` members are slow.
pub(crate) fn layout(
    rooms: u32,
    members: u32,
    publishers: u32,
    slow: u32,
    id_base: u32,
) -> Vec<ConnSpec> {
    let mut v = Vec::with_capacity((rooms * members) as usize);
    for m in 0..members {
        for r in 0..rooms {
            let role = if m >= members - slow.min(members) {
                Role::Slow
            } else {
                Role::Member
            };
            v.push(ConnSpec {
                room: r,
                id: id_base + m * rooms + r,
                role,
                publisher: (m < publishers).then_some(r * publishers + m),
                node: 0,
            });
        }
    }
    v
}

/// `count` connections of `role` after the first `id_base` ids (which `layout` gave out), none
/// publishing; connection i joins room `room(i)`.
pub(crate) fn extra_conns(
    id_base: u32,
    count: u32,
    role: Role,
    room: impl Fn(u32) -> u32,
) -> Vec<ConnSpec> {
    (0..count)
        .map(|i| ConnSpec {
            room: room(i),
            id: id_base + i,
            role,
            publisher: None,
            node: 0,
        })
        .collect()
}

pub(crate) fn publishers_per_worker(specs: &[ConnSpec], workers: &Workers) -> Vec<usize> {
    let n = workers.len();
    (0..n)
        .map(|w| {
            specs
                .iter()
                .skip(w)
                .step_by(n)
                .filter(|s| s.publisher.is_some())
                .count()
        })
        .collect()
}

fn own_cpu_us() -> u64 {
    sys::process_cpu_us()
}

/// Samples the relay's RSS in the background and keeps the peak.
pub struct PeakRss {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl PeakRss {
    pub fn start(pid: Option<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let handle = pid.map(|pid| {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                // Bounded: at most one hour of 100 ms samples even if never stopped.
                for _ in 0..36_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Some(s) = sys::sample_process(pid) {
                        peak.fetch_max(s.rss_kb, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        });
        PeakRss { stop, peak, handle }
    }

    pub fn finish(mut self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let h = self.handle.take()?;
        let _ = h.join();
        Some(self.peak.load(Ordering::Relaxed))
    }
}

/// What one publishing phase measured.
pub struct Phase {
    pub rate: f64,
    pub sent: u64,
    pub expected: u64,
    pub deliveries: u64,
    pub duplicates: u64,
    pub gaps: u64,
    pub late: u64,
    pub latency: Histogram<u64>,
    pub lag: Histogram<u64>,
    pub errors: std::collections::BTreeMap<String, u64>,
    pub ended: std::collections::BTreeMap<String, u64>,
    pub elapsed_s: f64,
    pub relay_cpu_us: Option<u64>,
    /// Redis's CPU over the phase (multi-node targets).
    pub redis_cpu_us: Option<u64>,
    pub relay_socket_writes: Option<f64>,
    pub relay_frames: Option<f64>,
    pub relay_syscw: Option<u64>,
    pub client_cpu_us: u64,
    pub reads: u64,
    pub frames_in: u64,
    pub rss_end_kb: Option<u64>,
}

impl Phase {
    pub fn delivered_share(&self) -> f64 {
        if self.expected == 0 {
            1.0
        } else {
            self.deliveries.saturating_sub(self.duplicates) as f64 / self.expected as f64
        }
    }

    pub fn p99_ms(&self) -> f64 {
        if self.latency.is_empty() {
            f64::INFINITY
        } else {
            self.latency.value_at_quantile(0.99) as f64 / 1000.0
        }
    }
}

/// Publishes for `duration_ms` at `rate`, waits for the tail of deliveries, and measures.
/// `receivers_per_room` counting members (publishers included) gives the expected deliveries.
pub(crate) fn run_phase(
    target: &Target,
    workers: &mut Workers,
    pubs: &[usize],
    rate: f64,
    duration_ms: u64,
    text_bytes: usize,
    receivers_per_room: u64,
) -> anyhow::Result<Phase> {
    run_phase_with(
        target,
        workers,
        pubs,
        rate,
        duration_ms,
        text_bytes,
        receivers_per_room,
        || Ok(false),
    )
}

/// `run_phase`, calling `on_start` right after publishing started (the `flood` scenario starts
/// its attackers there, so the relay's CPU and the latencies cover the attack). When `on_start`
/// returns true, publishing stops then instead of running its full `duration_ms` (the `storm`
/// scenario measures exactly while its storm lasts).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_phase_with(
    target: &Target,
    workers: &mut Workers,
    pubs: &[usize],
    rate: f64,
    duration_ms: u64,
    text_bytes: usize,
    receivers_per_room: u64,
    on_start: impl FnOnce() -> anyhow::Result<bool>,
) -> anyhow::Result<Phase> {
    workers.reset()?;
    let client0 = workers.report()?.cpu_us + own_cpu_us();
    let p0 = RelayPoint::take(target, true);
    workers.publish_start(pubs, rate, duration_ms, text_bytes)?;
    if on_start()? {
        workers.all(Command::PublishStop)?;
    }
    let published = workers.publish_wait()?;
    let expected = published.sent * receivers_per_room;
    // The tail: wait until everything expected arrived, or nothing moved for 500 ms (max 5 s).
    let t_tail = Instant::now();
    let mut last = workers.report()?;
    let mut still = Instant::now();
    while last.deliveries < expected && t_tail.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
        let s = workers.report()?;
        if s.deliveries != last.deliveries {
            still = Instant::now();
        } else if still.elapsed() > Duration::from_millis(500) {
            last = s;
            break;
        }
        last = s;
    }
    let p1 = RelayPoint::take(target, true);
    let s = last;
    let sp = spend(&p0, &p1);
    Ok(Phase {
        rate,
        sent: published.sent,
        expected,
        deliveries: s.deliveries,
        duplicates: s.duplicates,
        gaps: s.gaps,
        late: s.late,
        latency: s.latency,
        lag: published.lag,
        errors: s.errors,
        ended: s.ended,
        elapsed_s: published.elapsed_us as f64 / 1e6,
        relay_cpu_us: sp.cpu_us,
        redis_cpu_us: sp.backing_cpu_us,
        relay_socket_writes: sp.socket_writes,
        relay_frames: sp.frames_delivered,
        relay_syscw: sp.syscw,
        client_cpu_us: (s.cpu_us + own_cpu_us()).saturating_sub(client0),
        reads: s.reads,
        frames_in: s.frames,
        rss_end_kb: p1.rss_kb(),
    })
}

/// Writes a phase's figures into a report, keys prefixed with `p`.
pub(crate) fn put_phase(r: &mut Report, p: &str, ph: &Phase) {
    let k = |s: &str| format!("{p}{s}");
    r.num(&k("offered_msgs_per_s"), "offered messages/s", ph.rate);
    r.int(&k("sent"), "messages sent", ph.sent);
    r.int(
        &k("expected_deliveries"),
        "deliveries expected",
        ph.expected,
    );
    r.int(&k("deliveries"), "deliveries received", ph.deliveries);
    r.num(
        &k("delivered_share"),
        "delivered share",
        ph.delivered_share(),
    );
    r.int(
        &k("lost"),
        "lost (expected - unique received)",
        ph.expected.saturating_sub(ph.deliveries - ph.duplicates),
    );
    r.int(&k("duplicates"), "duplicates", ph.duplicates);
    r.int(&k("gaps"), "gaps (counter skipped)", ph.gaps);
    r.int(&k("reordered"), "reordered (late)", ph.late);
    let secs = ph.elapsed_s.max(1e-9);
    r.num(
        &k("expected_deliveries_per_s"),
        "deliveries/s expected",
        ph.expected as f64 / secs,
    );
    r.num(
        &k("deliveries_per_s"),
        "deliveries/s achieved",
        ph.deliveries as f64 / secs,
    );
    r.latency(&k("latency"), "latency (send -> receive)", &ph.latency);
    r.latency(&k("send_lag"), "publisher lag behind schedule", &ph.lag);
    r.counts(&k("errors"), "error events", &ph.errors);
    r.counts(
        &k("ended_by_relay"),
        "connections ended by relay",
        &ph.ended,
    );
    r.opt(
        &k("relay_cpu_s"),
        "relay CPU (s)",
        ph.relay_cpu_us.map(|u| u as f64 / 1e6),
    );
    r.opt(
        &k("relay_cpu_cores"),
        "relay CPU (cores)",
        ph.relay_cpu_us.map(|u| u as f64 / 1e6 / secs),
    );
    r.opt(
        &k("relay_cpu_us_per_delivery"),
        "relay CPU per delivery (us)",
        ph.relay_cpu_us
            .filter(|_| ph.deliveries > 0)
            .map(|u| u as f64 / ph.deliveries as f64),
    );
    if let Some(u) = ph.redis_cpu_us {
        r.num(
            &k("redis_cpu_cores"),
            "Redis CPU (cores)",
            u as f64 / 1e6 / secs,
        );
    }
    r.num(
        &k("client_cpu_s"),
        "client CPU (s)",
        ph.client_cpu_us as f64 / 1e6,
    );
    r.num(
        &k("client_cpu_us_per_delivery"),
        "client CPU per delivery (us)",
        ph.client_cpu_us as f64 / ph.deliveries.max(1) as f64,
    );
    r.num(
        &k("client_frames_per_read"),
        "frames per client read",
        ph.frames_in as f64 / ph.reads.max(1) as f64,
    );
    r.opt(
        &k("relay_socket_writes"),
        "relay socket writes (metric)",
        ph.relay_socket_writes,
    );
    r.opt(
        &k("relay_writes_per_frame"),
        "relay writes per delivered frame",
        match (ph.relay_socket_writes, ph.relay_frames) {
            (Some(w), Some(f)) if f > 0.0 => Some(w / f),
            _ => None,
        },
    );
    r.opt(
        &k("relay_write_syscalls_per_delivery"),
        "relay write/writev calls per delivery (/proc io; a `send` to an idle socket is not one: see writes per frame)",
        ph.relay_syscw
            .filter(|_| ph.deliveries > 0)
            .map(|c| c as f64 / ph.deliveries as f64),
    );
    r.opt(
        &k("relay_rss_kb"),
        "relay RSS at end (KiB)",
        ph.rss_end_kb.map(|v| v as f64),
    );
    if ph.errors.get("rate_limited").copied().unwrap_or(0) > 0 {
        r.note(format!(
            "{p}the relay rate-limited publishers: start it with RATE_LIMIT=1000000 (--spawn does this)"
        ));
    }
}

pub(crate) fn put_connect(r: &mut Report, c: &crate::coord::Connected, wanted: u64) {
    r.int("connections_wanted", "connections wanted", wanted);
    r.int("connections_ok", "connections joined", c.ok);
    r.counts("connect_failures", "connect failures", &c.failed);
    r.latency("connect_latency", "connect -> history latency", &c.latency);
    r.num(
        "connect_s",
        "time to open all (s)",
        c.elapsed_us as f64 / 1e6,
    );
}

/// Relay RSS before and after opening `joined` idle connections, and the growth per connection
/// (summed over the nodes of a multi-node target).
pub(crate) fn put_idle_memory(
    r: &mut Report,
    before: &RelayPoint,
    after: &RelayPoint,
    joined: u64,
) {
    r.opt(
        "relay_rss_before_kb",
        "relay RSS before (KiB)",
        before.rss_kb().map(|v| v as f64),
    );
    r.opt(
        "relay_rss_after_kb",
        "relay RSS with all idle (KiB)",
        after.rss_kb().map(|v| v as f64),
    );
    let per_conn = |b: Option<u64>, x: Option<u64>| match (b, x) {
        (Some(b), Some(x)) if joined > 0 => Some((x as f64 - b as f64) * 1024.0 / joined as f64),
        _ => None,
    };
    r.opt(
        "relay_bytes_per_idle_conn",
        "relay RSS per idle connection (bytes)",
        per_conn(before.rss_kb(), after.rss_kb()),
    );
    r.opt(
        "relay_anon_before_kb",
        "relay anonymous RSS before (KiB)",
        before.anon_kb().map(|v| v as f64),
    );
    r.opt(
        "relay_anon_after_kb",
        "relay anonymous RSS with all idle (KiB)",
        after.anon_kb().map(|v| v as f64),
    );
    r.opt(
        "relay_anon_bytes_per_idle_conn",
        "relay anonymous RSS per idle connection (bytes)",
        per_conn(before.anon_kb(), after.anon_kb()),
    );
}

pub(crate) fn need_pid(r: &mut Report, target: &Target) {
    if target.pid.is_none() {
        r.note("relay PID unknown: pass --pid (or use --spawn) to get relay CPU and memory");
    }
}

pub fn idle(target: &Target, c: &Common, a: &IdleArgs) -> anyhow::Result<Report> {
    let mut r = Report::new("idle", target);
    need_pid(&mut r, target);
    let specs = layout(a.rooms, a.conns.div_ceil(a.rooms.max(1)), 0, 0, 0)
        .into_iter()
        .take(a.conns as usize)
        .collect::<Vec<_>>();
    let mut w = Workers::start(target, &specs, c.procs, None)?;
    std::thread::sleep(Duration::from_millis(300));
    let before = RelayPoint::take(target, false);
    let client0 = own_cpu_us();
    let conn = w.connect(&[Role::Member], c)?;
    eprintln!(
        "idle: {} joined, waiting for presence traffic to settle",
        conn.ok
    );
    let settled = w.settle(
        Duration::from_millis(1500),
        Duration::from_millis(a.settle_max_ms),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let after = RelayPoint::take(target, false);
    r.int("procs", "load processes", w.len() as u64);
    r.int("rooms", "rooms", a.rooms as u64);
    put_connect(&mut r, &conn, a.conns as u64);
    r.int(
        "presence_events",
        "presence events received",
        settled.presence,
    );
    r.counts(
        "ended_by_relay",
        "connections ended by relay",
        &settled.ended,
    );
    put_idle_memory(&mut r, &before, &after, conn.ok);
    let sp = spend(&before, &after);
    r.opt(
        "relay_cpu_s",
        "relay CPU while opening (s)",
        sp.cpu_us.map(|u| u as f64 / 1e6),
    );
    r.opt(
        "relay_cpu_us_per_connect",
        "relay CPU per connection opened (us)",
        sp.cpu_us
            .filter(|_| conn.ok > 0)
            .map(|u| u as f64 / conn.ok as f64),
    );
    r.num(
        "client_cpu_s",
        "client CPU (s)",
        (settled.cpu_us + own_cpu_us() - client0) as f64 / 1e6,
    );
    let (closed, forced) = w.close(&[Role::Member], 10_000)?;
    std::thread::sleep(Duration::from_millis(2000));
    let end = RelayPoint::take(target, false);
    r.int("closed", "closed by client", closed);
    r.int("close_forced", "closes forced (no close handshake)", forced);
    r.opt(
        "relay_rss_after_close_kb",
        "relay RSS 2 s after closing (KiB)",
        end.rss_kb().map(|v| v as f64),
    );
    Ok(r)
}

pub fn fanout(target: &Target, c: &Common, a: &FanoutArgs) -> anyhow::Result<Report> {
    let mut r = Report::new("fanout", target);
    need_pid(&mut r, target);
    let specs = layout(a.rooms, a.members, a.publishers.min(a.members), 0, 0);
    let mut w = Workers::start(target, &specs, c.procs, None)?;
    let conn = w.connect(&[Role::Member], c)?;
    w.settle(Duration::from_millis(1000), Duration::from_secs(30))?;
    eprintln!(
        "fanout: {} joined; publishing {} msg/s for {} ms",
        conn.ok, a.rate, a.duration_ms
    );
    let pubs = publishers_per_worker(&specs, &w);
    let ph = run_phase(
        target,
        &mut w,
        &pubs,
        a.rate,
        a.duration_ms,
        a.text_bytes,
        a.members as u64,
    )?;
    r.int("procs", "load processes", w.len() as u64);
    r.put(
        "shape",
        "shape",
        json!(format!(
            "{} rooms x {} members, {} publisher(s)/room",
            a.rooms, a.members, a.publishers
        )),
    );
    r.int("rooms", "rooms", a.rooms as u64);
    r.int("members", "members per room", a.members as u64);
    r.int("text_bytes", "text characters", a.text_bytes as u64);
    put_connect(&mut r, &conn, specs.len() as u64);
    put_phase(&mut r, "", &ph);
    w.close(&[Role::Member], 10_000)?;
    Ok(r)
}

pub fn saturate(target: &Target, c: &Common, a: &SaturateArgs) -> anyhow::Result<Report> {
    let mut r = Report::new("saturate", target);
    need_pid(&mut r, target);
    let specs = layout(a.rooms, a.members, a.publishers.min(a.members), 0, 0);
    let mut w = Workers::start(target, &specs, c.procs, None)?;
    let conn = w.connect(&[Role::Member], c)?;
    w.settle(Duration::from_millis(1000), Duration::from_secs(30))?;
    let pubs = publishers_per_worker(&specs, &w);
    let mut steps = Vec::new();
    let mut best: Option<(f64, f64)> = None; // (deliveries/s, msgs/s)
    let mut rate = a.start_rate;
    let mut stop_reason = "max steps reached".to_owned();
    eprintln!(
        "saturate: {:>10} {:>12} {:>9} {:>9} {:>10} {:>11} {:>11}",
        "msgs/s", "deliv/s", "share", "p99 ms", "relay us/d", "client us/d", "pub lag p99"
    );
    for _ in 0..a.max_steps {
        let ph = run_phase(
            target,
            &mut w,
            &pubs,
            rate,
            a.step_ms,
            a.text_bytes,
            a.members as u64,
        )?;
        let dps = ph.deliveries as f64 / ph.elapsed_s.max(1e-9);
        let share = ph.delivered_share();
        let p99 = ph.p99_ms();
        let relay_us = ph
            .relay_cpu_us
            .map(|u| u as f64 / ph.deliveries.max(1) as f64);
        let client_us = ph.client_cpu_us as f64 / ph.deliveries.max(1) as f64;
        let lag_p99_ms = ph.lag.value_at_quantile(0.99) as f64 / 1000.0;
        eprintln!(
            "saturate: {:>10.0} {:>12.0} {:>9.3} {:>9.2} {:>10} {:>11.2} {:>11.2}",
            rate,
            dps,
            share,
            p99,
            relay_us.map(|v| format!("{v:.2}")).unwrap_or("n/a".into()),
            client_us,
            lag_p99_ms
        );
        steps.push(json!({
            "offered_msgs_per_s": rate,
            "deliveries_per_s": dps.round(),
            "delivered_share": (share * 1000.0).round() / 1000.0,
            "p99_ms": p99,
            "p999_ms": if ph.latency.is_empty() { Value::Null } else { json!(ph.latency.value_at_quantile(0.999) as f64 / 1000.0) },
            "relay_cpu_us_per_delivery": relay_us,
            "relay_cpu_cores": ph.relay_cpu_us.map(|u| u as f64 / 1e6 / ph.elapsed_s.max(1e-9)),
            "client_cpu_us_per_delivery": client_us,
            "client_cpu_cores": ph.client_cpu_us as f64 / 1e6 / ph.elapsed_s.max(1e-9),
            "publisher_lag_p99_ms": lag_p99_ms,
        }));
        if share < a.min_delivered || p99 > a.max_p99_ms {
            stop_reason =
                format!("at {rate:.0} msgs/s: delivered share {share:.3}, p99 {p99:.1} ms");
            break;
        }
        best = Some((dps, rate));
        rate *= a.factor;
        // Let the relay drain anything still queued before the next step.
        std::thread::sleep(Duration::from_millis(1000));
    }
    r.int("procs", "load processes", w.len() as u64);
    r.put(
        "shape",
        "shape",
        json!(format!(
            "{} rooms x {} members, {} publisher(s)/room",
            a.rooms, a.members, a.publishers
        )),
    );
    put_connect(&mut r, &conn, specs.len() as u64);
    r.opt(
        "max_sustained_deliveries_per_s",
        "highest sustained deliveries/s",
        best.map(|b| b.0),
    );
    r.opt(
        "max_sustained_msgs_per_s",
        "at offered messages/s",
        best.map(|b| b.1),
    );
    r.put("stop_reason", "stopped", json!(stop_reason));
    r.json.insert("steps".into(), Value::Array(steps));
    w.close(&[Role::Member], 10_000)?;
    Ok(r)
}

pub fn handshake(target: &Target, c: &Common, a: &HandshakeArgs) -> anyhow::Result<Report> {
    let mut r = Report::new("handshake", target);
    need_pid(&mut r, target);
    let procs = c.procs.max(1);
    let mut w = Workers::start(target, &[], procs, None)?;
    let n = w.len() as u64;
    let cmds: Vec<Command> = (0..n)
        .map(|i| Command::Handshake {
            count: a.count / n + u64::from(i < a.count % n),
            concurrency: (a.concurrency as u64 / n).max(1) as usize,
            timeout_ms: c.connect_timeout_ms,
        })
        .collect();
    let client0 = w.report()?.cpu_us + own_cpu_us();
    let p0 = RelayPoint::take(target, false);
    let t0 = Instant::now();
    let replies = w.each(&cmds)?;
    let wall = t0.elapsed().as_secs_f64();
    let p1 = RelayPoint::take(target, false);
    let client1 = w.report()?.cpu_us + own_cpu_us();
    let mut ok = 0;
    let mut failed = std::collections::BTreeMap::new();
    let mut hist = new_histogram();
    for rep in replies {
        if let Reply::Handshakes(h) = rep {
            ok += h.ok;
            merge_counts(&mut failed, &h.failed);
            merge_hist(&mut hist, &h.latency_us);
        }
    }
    let sp = spend(&p0, &p1);
    r.int("procs", "load processes", n);
    r.int("concurrency", "in flight", a.concurrency as u64);
    r.int("handshakes_ok", "handshakes completed", ok);
    r.counts("handshake_failures", "failures", &failed);
    r.num("wall_s", "wall time (s)", wall);
    r.num(
        "handshakes_per_s",
        "handshakes/s",
        ok as f64 / wall.max(1e-9),
    );
    r.latency("latency", "connect -> first event", &hist);
    r.opt(
        "relay_cpu_s",
        "relay CPU (s)",
        sp.cpu_us.map(|u| u as f64 / 1e6),
    );
    r.opt(
        "relay_cpu_us_per_handshake",
        "relay CPU per handshake (us)",
        sp.cpu_us.filter(|_| ok > 0).map(|u| u as f64 / ok as f64),
    );
    r.num(
        "client_cpu_s",
        "client CPU (s)",
        client1.saturating_sub(client0) as f64 / 1e6,
    );
    r.opt(
        "relay_rss_after_kb",
        "relay RSS after (KiB)",
        p1.rss_kb().map(|v| v as f64),
    );
    Ok(r)
}

pub fn churn(target: &Target, c: &Common, a: &ChurnArgs) -> anyhow::Result<Report> {
    let mut r = Report::new("churn", target);
    need_pid(&mut r, target);
    let mut specs = layout(a.rooms, a.members, 1, 0, 0);
    let base = specs.len() as u32;
    specs.extend(extra_conns(base, a.wave_conns, Role::Churn, |i| {
        i % a.rooms.max(1)
    }));
    let mut w = Workers::start(target, &specs, c.procs, None)?;
    let start_point = RelayPoint::take(target, false);
    let conn = w.connect(&[Role::Member], c)?;
    w.settle(Duration::from_millis(1000), Duration::from_secs(30))?;
    let pubs = publishers_per_worker(&specs, &w);
    // Publish for longer than the waves can take; stopped explicitly after the last wave.
    let budget_ms = (a.waves as u64 + 2) * (a.hold_ms + 60_000);
    w.reset()?;
    w.publish_start(&pubs, a.rate, budget_ms, a.text_bytes)?;
    // Let every room's history fill and the steady state establish itself before taking the
    // reference: until the histories are full the relay's memory grows with them, waves or not.
    let fill =
        Duration::from_secs_f64(1.5 * f64::from(a.history) * f64::from(a.rooms) / a.rate.max(1.0));
    std::thread::sleep(fill.max(Duration::from_millis(3000)));
    let reference = RelayPoint::take(target, true);
    let peak = PeakRss::start(target.pid);
    let mut waves = Vec::new();
    let mut first_wave_after: Option<u64> = None;
    let mut failed_total = std::collections::BTreeMap::new();
    let mut opened = 0;
    let t0 = Instant::now();
    for k in 0..a.waves {
        let cn = w.connect(&[Role::Churn], c)?;
        opened += cn.ok;
        merge_counts(&mut failed_total, &cn.failed);
        let with_wave = RelayPoint::take(target, false);
        std::thread::sleep(Duration::from_millis(a.hold_ms));
        w.close(&[Role::Churn], 10_000)?;
        std::thread::sleep(Duration::from_millis(300));
        let after = RelayPoint::take(target, false);
        if k == 0 {
            first_wave_after = after.rss_kb();
        }
        eprintln!(
            "churn: wave {:>2}: {} joined, RSS with wave {} KiB, after {} KiB",
            k + 1,
            cn.ok,
            with_wave.rss_kb().unwrap_or(0),
            after.rss_kb().unwrap_or(0)
        );
        waves.push(json!({"wave": k + 1, "joined": cn.ok, "rss_with_wave_kb": with_wave.rss_kb(), "rss_after_kb": after.rss_kb()}));
    }
    let waves_s = t0.elapsed().as_secs_f64();
    w.all(Command::PublishStop)?;
    let published = w.publish_wait()?;
    std::thread::sleep(Duration::from_millis(2000));
    let stats = w.report()?;
    let end = RelayPoint::take(target, true);
    let peak_kb = peak.finish();
    let expected = published.sent * a.members as u64;
    r.int("procs", "load processes", w.len() as u64);
    r.put(
        "shape",
        "shape",
        json!(format!(
            "{} rooms x {} steady members; {} waves of {}",
            a.rooms, a.members, a.waves, a.wave_conns
        )),
    );
    put_connect(&mut r, &conn, (a.rooms * a.members) as u64);
    r.int("wave_conns_opened", "wave connections opened", opened);
    r.counts("wave_failures", "wave connect failures", &failed_total);
    r.num("waves_s", "time for all waves (s)", waves_s);
    r.num(
        "wave_conns_per_s",
        "wave connections/s (open+close)",
        opened as f64 / waves_s.max(1e-9),
    );
    r.opt(
        "relay_rss_start_kb",
        "relay RSS before any connection (KiB)",
        start_point.rss_kb().map(|v| v as f64),
    );
    r.opt(
        "relay_rss_reference_kb",
        "relay RSS steady, before waves (KiB)",
        reference.rss_kb().map(|v| v as f64),
    );
    r.opt(
        "relay_rss_peak_kb",
        "relay RSS peak during waves (KiB)",
        peak_kb.map(|v| v as f64),
    );
    r.opt(
        "relay_rss_end_kb",
        "relay RSS 2 s after last wave (KiB)",
        end.rss_kb().map(|v| v as f64),
    );
    let over = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a0), Some(b)) if a0 > 0 => Some(b as f64 / a0 as f64),
        _ => None,
    };
    r.opt(
        "rss_end_over_reference",
        "RSS end / steady reference",
        over(reference.rss_kb(), end.rss_kb()),
    );
    // The same for the anonymous part alone (the heap and stacks, not the binary's pages).
    r.opt(
        "relay_anon_reference_kb",
        "relay anonymous RSS steady (KiB)",
        reference.anon_kb().map(|v| v as f64),
    );
    r.opt(
        "relay_anon_end_kb",
        "relay anonymous RSS end (KiB)",
        end.anon_kb().map(|v| v as f64),
    );
    r.opt(
        "anon_end_over_reference",
        "anonymous RSS end / steady reference",
        over(reference.anon_kb(), end.anon_kb()),
    );
    // After the first wave the allocator has seen the peak working set once; growth past this
    // point across waves would be a leak, while the step from the reference is retention.
    r.opt(
        "relay_rss_after_first_wave_kb",
        "relay RSS after first wave (KiB)",
        first_wave_after.map(|v| v as f64),
    );
    r.opt(
        "rss_end_over_first_wave",
        "RSS end / after first wave",
        match (first_wave_after, end.rss_kb()) {
            (Some(a0), Some(b)) if a0 > 0 => Some(b as f64 / a0 as f64),
            _ => None,
        },
    );
    r.int(
        "steady_sent",
        "messages sent by steady members",
        published.sent,
    );
    r.int(
        "steady_expected",
        "deliveries expected (steady members)",
        expected,
    );
    r.int(
        "steady_deliveries",
        "deliveries received (steady members)",
        stats.deliveries,
    );
    r.int("steady_duplicates", "duplicates", stats.duplicates);
    r.int("steady_gaps", "gaps", stats.gaps);
    r.latency(
        "steady_latency",
        "steady members' latency during churn",
        &stats.latency,
    );
    r.counts("ended_by_relay", "connections ended by relay", &stats.ended);
    let sp = spend(&reference, &end);
    r.opt(
        "relay_cpu_s",
        "relay CPU during waves (s)",
        sp.cpu_us.map(|u| u as f64 / 1e6),
    );
    r.json.insert("waves".into(), Value::Array(waves));
    w.close(&[Role::Member, Role::Churn], 10_000)?;
    Ok(r)
}

pub fn slow(target: &Target, c: &Common, a: &SlowArgs) -> anyhow::Result<Report> {
    let mut r = Report::new("slow", target);
    need_pid(&mut r, target);
    let total = a.members + a.slow;
    let specs = layout(a.rooms, total, 1, a.slow, 0);
    let mut w = Workers::start(target, &specs, c.procs, Some(a.slow_rcvbuf))?;
    let conn = w.connect(&[Role::Member], c)?;
    w.settle(Duration::from_millis(1000), Duration::from_secs(30))?;
    let pubs = publishers_per_worker(&specs, &w);
    eprintln!("slow: phase 1, {} healthy members only", conn.ok);
    let healthy = run_phase(
        target,
        &mut w,
        &pubs,
        a.rate,
        a.duration_ms,
        a.text_bytes,
        a.members as u64,
    )?;
    let slow_conn = w.connect(&[Role::Slow], c)?;
    w.settle(Duration::from_millis(500), Duration::from_secs(10))?;
    eprintln!(
        "slow: phase 2, with {} members that never read",
        slow_conn.ok
    );
    let m0 = RelayPoint::take(target, true);
    let peak = PeakRss::start(target.pid);
    let mixed = run_phase(
        target,
        &mut w,
        &pubs,
        a.rate,
        a.duration_ms,
        a.text_bytes,
        a.members as u64,
    )?;
    let peak_kb = peak.finish();
    let m1 = RelayPoint::take(target, true);
    let mut drained = DrainReply::default();
    for rep in w.all(Command::DrainSlow { timeout_ms: 5000 })? {
        if let Reply::Drained(x) = rep {
            merge_counts(&mut drained.outcomes, &x.outcomes);
            drained.bytes_drained += x.bytes_drained;
        }
    }
    r.int("procs", "load processes", w.len() as u64);
    r.put(
        "shape",
        "shape",
        json!(format!(
            "{} rooms x ({} healthy + {} never reading)",
            a.rooms, a.members, a.slow
        )),
    );
    put_connect(&mut r, &conn, (a.rooms * a.members) as u64);
    r.int("slow_joined", "slow members joined", slow_conn.ok);
    put_phase(&mut r, "without_slow_", &healthy);
    put_phase(&mut r, "with_slow_", &mixed);
    r.counts("slow_outcomes", "how slow members ended", &drained.outcomes);
    r.int(
        "slow_bytes_drained",
        "bytes the slow members held when drained",
        drained.bytes_drained,
    );
    r.opt(
        "relay_slow_consumer_closes",
        "relay slow-consumer closes (metric)",
        match (
            m0.metric("roomcast_slow_consumer_closes_total"),
            m1.metric("roomcast_slow_consumer_closes_total"),
        ) {
            (Some(x), Some(y)) => Some(y - x),
            _ => None,
        },
    );
    r.opt(
        "relay_rss_before_slow_phase_kb",
        "relay RSS before slow phase (KiB)",
        m0.rss_kb().map(|v| v as f64),
    );
    r.opt(
        "relay_rss_peak_slow_phase_kb",
        "relay RSS peak in slow phase (KiB)",
        peak_kb.map(|v| v as f64),
    );
    w.close(&[Role::Member, Role::Slow], 10_000)?;
    Ok(r)
}

/// Change of a relay counter (a full `name{labels}` key, as in the exposition) between two points.
fn metric_delta(a: &RelayPoint, b: &RelayPoint, key: &str) -> Option<f64> {
    Some(b.metric(key)? - a.metric(key)?)
}

/// Relay counters that tell what a flood made the relay do, per phase (null where the relay does
/// not export them).
fn put_flood_counters(r: &mut Report, p: &str, a: &RelayPoint, b: &RelayPoint) {
    for (key, label, metric) in [
        (
            "relay_control_frame_closes",
            "relay closes for control frames (metric)",
            r#"roomcast_limit_closes_total{limit="control_frames"}"#,
        ),
        (
            "relay_closes_1008",
            "relay closes with 1008 (metric)",
            r#"roomcast_connections_closed_total{code="1008"}"#,
        ),
        (
            "relay_slow_consumer_closes",
            "relay slow-consumer closes (metric)",
            "roomcast_slow_consumer_closes_total",
        ),
    ] {
        r.opt(&format!("{p}{key}"), label, metric_delta(a, b, metric));
    }
}

pub fn flood(target: &Target, c: &Common, a: &FloodArgs) -> anyhow::Result<Report> {
    if target.tls.is_some() {
        // The attackers write raw frames straight to the socket; through TLS they would be
        // testing the load balancer's TLS, not the relay.
        anyhow::bail!("flood needs a ws:// target (the relay itself, not a TLS load balancer)");
    }
    let mut r = Report::new("flood", target);
    need_pid(&mut r, target);
    let specs = layout(a.rooms, a.members, 1, 0, 0);
    let base = specs.len() as u32;
    // Each attacker in a room of its own.
    let attackers = extra_conns(base, a.attackers, Role::Attacker, |i| a.rooms + i);
    let mut w = Workers::start(target, &specs, c.procs, None)?;
    // Attackers write as fast as they can: a process of their own keeps that busy thread away
    // from the one that timestamps the victims' deliveries.
    let mut atk = Workers::start(target, &attackers, 1, None)?;
    let conn = w.connect(&[Role::Member], c)?;
    let atk_conn = atk.connect(&[Role::Attacker], c)?;
    w.settle(Duration::from_millis(1000), Duration::from_secs(30))?;
    let pubs = publishers_per_worker(&specs, &w);
    eprintln!(
        "flood: phase 1 (baseline), {} victims, {} attackers idle",
        conn.ok, atk_conn.ok
    );
    let m0 = RelayPoint::take(target, true);
    let peak = PeakRss::start(target.pid);
    let baseline = run_phase(
        target,
        &mut w,
        &pubs,
        a.rate,
        a.duration_ms,
        a.text_bytes,
        a.members as u64,
    )?;
    let baseline_peak = peak.finish();
    let m1 = RelayPoint::take(target, true);
    eprintln!(
        "flood: phase 2 (attack), {} attackers write {:?} frames, reads {:?}",
        atk_conn.ok, a.kind, a.attacker_reads
    );
    let peak = PeakRss::start(target.pid);
    let attack = run_phase_with(
        target,
        &mut w,
        &pubs,
        a.rate,
        a.duration_ms,
        a.text_bytes,
        a.members as u64,
        || {
            atk.attack_start(a.kind, a.attacker_reads, a.duration_ms)
                .map(|()| false)
        },
    )?;
    let attacked = atk.attack_wait()?;
    let attack_peak = peak.finish();
    let m2 = RelayPoint::take(target, true);

    r.int("procs", "load processes (victims)", w.len() as u64);
    r.put(
        "shape",
        "shape",
        json!(format!(
            "{} rooms x {} victims (1 publisher/room); {} attackers, a room each",
            a.rooms, a.members, a.attackers
        )),
    );
    r.int("rooms", "rooms", a.rooms as u64);
    r.int("members", "victims per room", a.members as u64);
    r.int("text_bytes", "text characters", a.text_bytes as u64);
    r.put("attack_kind", "attack", json!(a.kind));
    r.put("attacker_reads", "attackers read", json!(a.attacker_reads));
    put_connect(&mut r, &conn, specs.len() as u64);
    r.int("attackers", "attackers", a.attackers as u64);
    r.int("attackers_joined", "attackers joined", atk_conn.ok);
    put_phase(&mut r, "baseline_", &baseline);
    put_phase(&mut r, "attack_", &attack);
    let q = |ph: &Phase, q: f64| {
        (!ph.latency.is_empty()).then(|| ph.latency.value_at_quantile(q) as f64)
    };
    for (key, label, quantile) in [
        ("p50", "victim p50 attack / baseline", 0.5),
        ("p99", "victim p99 attack / baseline", 0.99),
        ("p999", "victim p99.9 attack / baseline", 0.999),
    ] {
        r.opt(
            &format!("victim_{key}_attack_over_baseline"),
            label,
            match (q(&attack, quantile), q(&baseline, quantile)) {
                (Some(x), Some(y)) if y > 0.0 => Some(x / y),
                _ => None,
            },
        );
    }
    r.counts(
        "attacker_outcomes",
        "how attackers ended",
        &attacked.outcomes,
    );
    r.put(
        "attacker_ended_after_ms",
        "attackers ended after (ms into the attack)",
        json!(attacked.ended_after_ms),
    );
    r.int(
        "attack_frames_sent",
        "flood frames written",
        attacked.frames_sent,
    );
    r.int(
        "attack_bytes_sent",
        "flood bytes written",
        attacked.bytes_sent,
    );
    r.num(
        "attack_frames_per_s",
        "flood frames/s",
        attacked.frames_sent as f64 / (attacked.elapsed_us as f64 / 1e6).max(1e-9),
    );
    r.int(
        "attacker_bytes_read",
        "bytes the attackers read",
        attacked.bytes_read,
    );
    r.num(
        "attacker_client_cpu_s",
        "attackers' client CPU (s)",
        attacked.cpu_us as f64 / 1e6,
    );
    put_flood_counters(&mut r, "baseline_", &m0, &m1);
    put_flood_counters(&mut r, "attack_", &m1, &m2);
    r.opt(
        "relay_rss_start_kb",
        "relay RSS before baseline (KiB)",
        m0.rss_kb().map(|v| v as f64),
    );
    r.opt(
        "baseline_relay_rss_peak_kb",
        "relay RSS peak in baseline (KiB)",
        baseline_peak.map(|v| v as f64),
    );
    r.opt(
        "attack_relay_rss_peak_kb",
        "relay RSS peak in attack (KiB)",
        attack_peak.map(|v| v as f64),
    );
    r.opt(
        "relay_rss_peak_kb",
        "relay RSS peak (KiB)",
        baseline_peak.max(attack_peak).map(|v| v as f64),
    );
    if attacked.outcomes.get("open").copied().unwrap_or(0) > 0 {
        r.note("attackers still open at the end of the attack stopped flooding by themselves");
    }
    w.close(&[Role::Member], 10_000)?;
    atk.close(&[Role::Attacker], 3_000)?;
    Ok(r)
}
