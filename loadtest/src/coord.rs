//! The coordinating side: starts load worker processes (this same binary, `worker`), hands each
//! its share of the connections, sends every worker the same command and gathers the replies,
//! and merges what they measured.
//!
//! It owns no sockets to the relay itself: all load comes from workers, so one process or ten
//! behave the same way.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command as Process, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use hdrhistogram::Histogram;

use crate::proto::*;
use crate::relay::Target;
use crate::sys;
use crate::worker::new_histogram;

/// Connections one worker process is given at most; below the 20,000 open files per process
/// this machine allows, with room for the runtime's own descriptors.
pub const MAX_CONNS_PER_WORKER: usize = 19_000;
/// Source addresses each worker binds, round robin, so no source runs out of ports.
pub const SOURCES_PER_WORKER: u32 = 4;

/// Longest wait for one worker reply; a worker that says nothing for this long is stuck, and the
/// run ends with an error instead of hanging.
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

struct WorkerProc {
    child: Child,
    stdin: ChildStdin,
    /// Reply lines, read by a thread so that waiting for them can time out.
    replies: mpsc::Receiver<String>,
}

fn read_replies(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

pub struct Workers {
    procs: Vec<WorkerProc>,
    pub conns_per_worker: Vec<usize>,
    /// How long the next long wait should take (a publishing or attack phase), for its
    /// progress lines.
    expected: Option<Duration>,
}

/// How often a long wait says where it is.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Progress lines on stderr for a wait that lasts: one every [`PROGRESS_EVERY`], none for a
/// short one.
struct Progress {
    what: &'static str,
    expected: Option<Duration>,
    started: Instant,
    next: Instant,
}

impl Progress {
    fn new(what: &'static str, expected: Option<Duration>) -> Progress {
        let started = Instant::now();
        Progress {
            what,
            expected,
            started,
            next: started + PROGRESS_EVERY,
        }
    }

    /// Print a line if one is due; `detail` is appended when not empty.
    fn tick(&mut self, detail: &str) {
        if Instant::now() < self.next {
            return;
        }
        self.next += PROGRESS_EVERY;
        let elapsed = self.started.elapsed().as_secs();
        let of = self
            .expected
            .map(|e| format!(" of ~{} s", e.as_secs().max(1)))
            .unwrap_or_default();
        let sep = if detail.is_empty() { "" } else { "; " };
        eprintln!("  ... {}: {elapsed} s{of}{sep}{detail}", self.what);
    }
}

impl Workers {
    /// Starts `procs` workers (0 = as many as the connection count needs) and splits `conns`
    /// among them round robin.
    pub fn start(
        target: &Target,
        conns: &[ConnSpec],
        procs: usize,
        slow_rcvbuf: Option<u32>,
    ) -> anyhow::Result<Self> {
        let needed = conns.len().div_ceil(MAX_CONNS_PER_WORKER).max(1);
        let procs = if procs == 0 {
            needed
        } else {
            procs.max(needed)
        };
        let exe = std::env::current_exe().context("locating this executable")?;
        let mut out = Workers {
            procs: Vec::new(),
            conns_per_worker: Vec::new(),
            expected: None,
        };
        let nodes: Vec<Endpoint> = target
            .nodes
            .iter()
            .map(|n| Endpoint {
                addr: n.addr,
                host_header: format!("127.0.0.1:{}", n.addr.port()),
            })
            .collect();
        let conns = spread_over_nodes(conns, nodes.len());
        for w in 0..procs {
            let mine: Vec<ConnSpec> = conns.iter().skip(w).step_by(procs).cloned().collect();
            let sources = if target.addr.ip().is_loopback() && target.addr.is_ipv4() {
                (0..SOURCES_PER_WORKER)
                    .map(|k| sys::source_address(w as u32 * SOURCES_PER_WORKER + k))
                    .collect()
            } else {
                Vec::new()
            };
            let plan = WorkerPlan {
                worker: w as u32,
                addr: target.addr,
                host_header: target.host_header.clone(),
                path: target.path.clone(),
                token: target.token.clone(),
                origin: target.origin.clone(),
                sources,
                slow_rcvbuf,
                tls: target.tls.clone(),
                nodes: nodes.clone(),
                conns: mine,
            };
            let mut child = Process::new(&exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting a load worker")?;
            let mut stdin = child.stdin.take().expect("stdin was piped");
            let replies = read_replies(child.stdout.take().expect("stdout was piped"));
            writeln!(stdin, "{}", serde_json::to_string(&plan)?)?;
            out.conns_per_worker.push(plan.conns.len());
            out.procs.push(WorkerProc {
                child,
                stdin,
                replies,
            });
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    /// Sends each worker its command (one per worker, in order) and returns their replies.
    pub fn each(&mut self, cmds: &[Command]) -> anyhow::Result<Vec<Reply>> {
        for (p, c) in self.procs.iter_mut().zip(cmds) {
            writeln!(p.stdin, "{}", serde_json::to_string(c)?)?;
            p.stdin.flush()?;
        }
        let mut replies = Vec::new();
        let what = cmds.first().map(|c| format!("{c:?}")).unwrap_or_default();
        let what: String = what.chars().take(60).collect();
        let expected = match cmds.first() {
            Some(Command::PublishWait | Command::AttackWait) => self.expected.take(),
            _ => None,
        };
        let mut progress =
            Progress::new(cmds.first().map_or("waiting", Command::activity), expected);
        for (i, p) in self.procs.iter_mut().enumerate() {
            let asked = Instant::now();
            let line = loop {
                match p.replies.recv_timeout(PROGRESS_EVERY) {
                    Ok(l) => break l,
                    Err(mpsc::RecvTimeoutError::Timeout) if asked.elapsed() < REPLY_TIMEOUT => {
                        progress.tick("");
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        bail!(
                            "load worker {i} gave no reply to {what} within {} s",
                            REPLY_TIMEOUT.as_secs()
                        )
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        bail!("load worker {i} exited unexpectedly during {what}")
                    }
                }
            };
            let r: Reply =
                serde_json::from_str(&line).with_context(|| format!("worker {i} said {line:?}"))?;
            if let Reply::Failed { error } = &r {
                bail!("load worker {i}: {error}");
            }
            replies.push(r);
        }
        Ok(replies)
    }

    /// Sends the same command to every worker.
    pub fn all(&mut self, cmd: Command) -> anyhow::Result<Vec<Reply>> {
        let cmds = vec![cmd; self.procs.len()];
        self.each(&cmds)
    }

    /// Open the connections of `roles`, at the run's connect rate, in-flight bound and timeout
    /// (`--connect-rate`, `--connect-in-flight`, `--connect-timeout-ms`) shared over the workers.
    pub fn connect(
        &mut self,
        roles: &[Role],
        common: &crate::scenarios::Common,
    ) -> anyhow::Result<Connected> {
        let n = self.procs.len() as f64;
        let replies = self.all(Command::Connect {
            roles: roles.to_vec(),
            rate_per_s: common.connect_rate / n,
            max_in_flight: (common.connect_in_flight as f64 / n).ceil() as usize,
            timeout_ms: common.connect_timeout_ms,
        })?;
        let mut c = Connected {
            ok: 0,
            failed: BTreeMap::new(),
            latency: new_histogram(),
            elapsed_us: 0,
        };
        for r in replies {
            let Reply::Connected(r) = r else {
                return Err(anyhow!("unexpected reply to connect"));
            };
            c.ok += r.ok;
            merge_counts(&mut c.failed, &r.failed);
            merge_hist(&mut c.latency, &r.latency_us);
            c.elapsed_us = c.elapsed_us.max(r.elapsed_us);
        }
        Ok(c)
    }

    pub fn report(&mut self) -> anyhow::Result<Stats> {
        let mut s = Stats::default();
        for r in self.all(Command::Report)? {
            let Reply::Stats(r) = r else {
                return Err(anyhow!("unexpected reply to report"));
            };
            s.add(&r);
        }
        Ok(s)
    }

    pub fn reset(&mut self) -> anyhow::Result<()> {
        self.all(Command::Reset).map(|_| ())
    }

    /// Starts publishing: `total_rate` messages per second split by each worker's share of
    /// publishers.
    pub fn publish_start(
        &mut self,
        publishers_per_worker: &[usize],
        total_rate: f64,
        duration_ms: u64,
        text_bytes: usize,
    ) -> anyhow::Result<()> {
        let total: usize = publishers_per_worker.iter().sum::<usize>().max(1);
        let cmds: Vec<Command> = publishers_per_worker
            .iter()
            .map(|&p| Command::PublishStart {
                rate_per_s: total_rate * p as f64 / total as f64,
                duration_ms,
                text_bytes,
            })
            .collect();
        self.each(&cmds)?;
        self.expected = Some(Duration::from_millis(duration_ms));
        Ok(())
    }

    /// Every publisher sends one message now; returns how many were sent and when the first
    /// left (`sys::monotonic_ns`).
    pub fn broadcast(&mut self, text_bytes: usize) -> anyhow::Result<(u64, u64)> {
        let (mut sent, mut first) = (0, u64::MAX);
        for r in self.all(Command::Broadcast { text_bytes })? {
            let Reply::Published(r) = r else {
                return Err(anyhow!("unexpected reply to broadcast"));
            };
            sent += r.sent;
            if r.sent > 0 {
                first = first.min(r.first_sent_ns);
            }
        }
        Ok((sent, first))
    }

    /// Starts a reconnect storm on every worker (see `Command::StormStart`); `max_in_flight`
    /// is split between them.
    pub fn storm_start(
        &mut self,
        roles: &[Role],
        max_in_flight: usize,
        timeout_ms: u64,
        retry: Retry,
    ) -> anyhow::Result<()> {
        let n = self.procs.len().max(1);
        self.all(Command::StormStart {
            roles: roles.to_vec(),
            max_in_flight: max_in_flight.div_ceil(n),
            timeout_ms,
            retry,
        })?;
        Ok(())
    }

    /// Waits for the storm; what every worker saw, merged.
    pub fn storm_wait(&mut self) -> anyhow::Result<Stormed> {
        let mut s = Stormed {
            connected: Connected {
                ok: 0,
                failed: BTreeMap::new(),
                latency: new_histogram(),
                elapsed_us: 0,
            },
            attempts: 0,
            retried: BTreeMap::new(),
            back: new_histogram(),
        };
        for r in self.all(Command::StormWait)? {
            let Reply::Connected(r) = r else {
                return Err(anyhow!("unexpected reply to a storm"));
            };
            s.connected.ok += r.ok;
            merge_counts(&mut s.connected.failed, &r.failed);
            merge_hist(&mut s.connected.latency, &r.latency_us);
            s.connected.elapsed_us = s.connected.elapsed_us.max(r.elapsed_us);
            s.attempts += r.attempts;
            merge_counts(&mut s.retried, &r.retried);
            merge_hist(&mut s.back, &r.back_us);
        }
        Ok(s)
    }

    pub fn publish_wait(&mut self) -> anyhow::Result<Published> {
        let mut p = Published {
            sent: 0,
            queued_sends: 0,
            lag: new_histogram(),
            elapsed_us: 0,
        };
        for r in self.all(Command::PublishWait)? {
            let Reply::Published(r) = r else {
                return Err(anyhow!("unexpected reply to publish"));
            };
            p.sent += r.sent;
            p.queued_sends += r.queued_sends;
            merge_hist(&mut p.lag, &r.lag_us);
            p.elapsed_us = p.elapsed_us.max(r.elapsed_us);
        }
        Ok(p)
    }

    /// Starts every worker's attackers flooding (`flood`); they stop by themselves after
    /// `duration_ms`.
    pub fn attack_start(
        &mut self,
        kind: AttackKind,
        reads: AttackReads,
        duration_ms: u64,
    ) -> anyhow::Result<()> {
        self.all(Command::AttackStart {
            kind,
            reads,
            duration_ms,
        })?;
        self.expected = Some(Duration::from_millis(duration_ms));
        Ok(())
    }

    pub fn attack_wait(&mut self) -> anyhow::Result<AttackReply> {
        let mut a = AttackReply::default();
        for r in self.all(Command::AttackWait)? {
            let Reply::Attacked(r) = r else {
                return Err(anyhow!("unexpected reply to attack"));
            };
            merge_counts(&mut a.outcomes, &r.outcomes);
            a.ended_after_ms.extend(r.ended_after_ms);
            a.frames_sent += r.frames_sent;
            a.bytes_sent += r.bytes_sent;
            a.bytes_read += r.bytes_read;
            a.elapsed_us = a.elapsed_us.max(r.elapsed_us);
            a.cpu_us += r.cpu_us;
        }
        a.ended_after_ms.sort_unstable();
        Ok(a)
    }

    pub fn close(&mut self, roles: &[Role], timeout_ms: u64) -> anyhow::Result<(u64, u64)> {
        let mut t = (0, 0);
        for r in self.all(Command::Close {
            roles: roles.to_vec(),
            timeout_ms,
        })? {
            if let Reply::Closed { closed, forced } = r {
                t.0 += closed;
                t.1 += forced;
            }
        }
        Ok(t)
    }

    /// Polls until no data frame has arrived for `quiet`, or `max` has passed; returns the last
    /// stats. Control frames do not count: the relay's heartbeat pings keep coming to connections
    /// that are otherwise quiet, and waiting for them to stop would always wait `max`.
    pub fn settle(&mut self, quiet: Duration, max: Duration) -> anyhow::Result<Stats> {
        let t0 = Instant::now();
        let mut last = self.report()?;
        let mut still_since = Instant::now();
        let mut progress = Progress::new("waiting for the relay to go quiet", Some(max));
        while t0.elapsed() < max {
            std::thread::sleep(Duration::from_millis(250));
            let s = self.report()?;
            if s.data_frames != last.data_frames {
                still_since = Instant::now();
            } else if still_since.elapsed() >= quiet {
                return Ok(s);
            }
            progress.tick(&format!("{} frames so far", s.data_frames));
            last = s;
        }
        eprintln!(
            "note: data frames were still arriving after {} s; going on",
            max.as_secs()
        );
        Ok(last)
    }
}

/// Assigns each connection a node so that every room has members on every node: the k-th
/// connection of room r goes to node (k + r) mod n. Across nodes, then, a delivery crosses the
/// broker, as it does for users behind a load balancer.
fn spread_over_nodes(conns: &[ConnSpec], n: usize) -> Vec<ConnSpec> {
    let mut k_in_room: BTreeMap<u32, usize> = BTreeMap::new();
    conns
        .iter()
        .map(|c| {
            let mut c = c.clone();
            if n > 0 {
                let k = k_in_room.entry(c.room).or_default();
                c.node = ((*k + c.room as usize) % n) as u16;
                *k += 1;
            }
            c
        })
        .collect()
}

impl Drop for Workers {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = writeln!(
                p.stdin,
                "{}",
                serde_json::to_string(&Command::Exit).unwrap_or_default()
            );
            let _ = p.stdin.flush();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for p in &mut self.procs {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = p.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Ok(None) = p.child.try_wait() {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
    }
}

pub struct Connected {
    pub ok: u64,
    pub failed: BTreeMap<String, u64>,
    pub latency: Histogram<u64>,
    pub elapsed_us: u64,
}

/// What a reconnect storm came to.
pub struct Stormed {
    pub connected: Connected,
    pub attempts: u64,
    /// Failed attempts that were tried again, by why they failed.
    pub retried: BTreeMap<String, u64>,
    /// From the start of the storm until each connection was back.
    pub back: Histogram<u64>,
}

pub struct Published {
    pub sent: u64,
    pub queued_sends: u64,
    pub lag: Histogram<u64>,
    pub elapsed_us: u64,
}

/// Merged worker statistics.
pub struct Stats {
    pub deliveries: u64,
    pub duplicates: u64,
    pub gaps: u64,
    pub late: u64,
    pub presence: u64,
    pub frames: u64,
    pub data_frames: u64,
    pub bytes_in: u64,
    pub reads: u64,
    pub errors: BTreeMap<String, u64>,
    pub ended: BTreeMap<String, u64>,
    pub latency: Histogram<u64>,
    pub open: u64,
    pub cpu_us: u64,
    /// When the last delivery arrived at any worker (`sys::monotonic_ns`), 0 before any.
    pub last_delivery_ns: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            deliveries: 0,
            duplicates: 0,
            gaps: 0,
            late: 0,
            presence: 0,
            frames: 0,
            data_frames: 0,
            bytes_in: 0,
            reads: 0,
            errors: BTreeMap::new(),
            ended: BTreeMap::new(),
            latency: new_histogram(),
            open: 0,
            cpu_us: 0,
            last_delivery_ns: 0,
        }
    }
}

impl Stats {
    fn add(&mut self, r: &StatsReply) {
        self.deliveries += r.deliveries;
        self.duplicates += r.duplicates;
        self.gaps += r.gaps;
        self.late += r.late;
        self.presence += r.presence;
        self.frames += r.frames;
        self.data_frames += r.data_frames;
        self.bytes_in += r.bytes_in;
        self.reads += r.reads;
        merge_counts(&mut self.errors, &r.errors);
        merge_counts(&mut self.ended, &r.ended);
        merge_hist(&mut self.latency, &r.latency_us);
        self.open += r.open;
        self.cpu_us += r.cpu_us;
        self.last_delivery_ns = self.last_delivery_ns.max(r.last_delivery_ns);
    }
}

pub fn merge_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

pub fn merge_hist(into: &mut Histogram<u64>, pairs: &HistPairs) {
    for &(v, c) in pairs {
        let _ = into.record_n(v.min(into.high()), c);
    }
}
