//! `compare`: every chosen scenario against roomcast and then the Node `ws` baseline, each on a
//! freshly spawned relay, on the same machine in the same run; then a table of the headline
//! figures with roomcast / baseline ratios. Raw JSON goes to `loadtest/results/<date>/`.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Args;
use serde_json::{json, Value};

use crate::floor::{self, FloorArgs};
use crate::relay::{self, RelayKind};
use crate::report::format_float;
use crate::scenarios::*;

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// Scenarios to run, comma-separated: floor, idle, fanout, hot, handshake, saturate, churn, slow.
    #[arg(
        long,
        default_value = "floor,idle,fanout,hot,handshake,churn,slow,saturate"
    )]
    pub scenarios: String,
    /// `small` finishes in a few minutes; `full` is the size of issue 3's targets.
    #[arg(long, default_value = "small")]
    pub size: String,
    /// Relays to run, comma-separated (roomcast, node).
    #[arg(long, default_value = "roomcast,node")]
    pub relays: String,
    /// Where the raw JSON goes [default: loadtest/results/YYYY-MM-DD].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

struct Preset {
    idle: IdleArgs,
    fanout: FanoutArgs,
    hot: FanoutArgs,
    handshake: HandshakeArgs,
    saturate: SaturateArgs,
    churn: ChurnArgs,
    slow: SlowArgs,
    /// The floor at the fan-out's connection count, the one its CPU per delivery is read against.
    floor: FloorArgs,
    /// The same floor over `floor::REFERENCE_SOCKETS` sockets, for reference.
    floor_reference: FloorArgs,
    connect_rate: f64,
}

fn preset(size: &str) -> anyhow::Result<Preset> {
    let full = match size {
        "small" => false,
        "full" => true,
        other => anyhow::bail!("--size is small or full, not {other}"),
    };
    let pick = |s: u64, f: u64| if full { f } else { s };
    let fanout = FanoutArgs {
        rooms: pick(20, 100) as u32,
        members: pick(50, 100) as u32,
        publishers: 1,
        rate: pick(200, 1000) as f64,
        duration_ms: pick(10_000, 20_000),
        text_bytes: 64,
    };
    // The kernel's cost per send grows with the socket count, so the floor is taken at the
    // fan-out's connection count (rooms x members: 1,000 small, 10,000 full).
    let floor = FloorArgs {
        sockets: fanout.rooms as usize * fanout.members as usize,
        rate: 100_000.0,
        duration_ms: pick(1500, 3000),
        frame_bytes: 200,
        batch: 4,
        warm_up_frames: 20,
        stride: 1,
    };
    Ok(Preset {
        idle: IdleArgs {
            conns: pick(2000, 15_000) as u32,
            rooms: pick(20, 100) as u32,
            settle_max_ms: 60_000,
        },
        fanout,
        hot: FanoutArgs {
            rooms: 1,
            members: pick(200, 1000) as u32,
            publishers: pick(4, 10) as u32,
            rate: pick(50, 200) as f64,
            duration_ms: pick(10_000, 20_000),
            text_bytes: 64,
        },
        handshake: HandshakeArgs {
            count: pick(3000, 20_000),
            concurrency: pick(32, 64) as usize,
        },
        saturate: SaturateArgs {
            rooms: pick(20, 100) as u32,
            members: pick(50, 100) as u32,
            publishers: 1,
            start_rate: pick(200, 500) as f64,
            factor: 1.25,
            step_ms: 5000,
            max_steps: 16,
            min_delivered: 0.95,
            max_p99_ms: 50.0,
            text_bytes: 64,
        },
        churn: ChurnArgs {
            rooms: pick(10, 20) as u32,
            members: 50,
            wave_conns: pick(500, 5000) as u32,
            waves: pick(5, 20) as u32,
            hold_ms: 500,
            rate: pick(100, 200) as f64,
            text_bytes: 64,
            history: 50,
        },
        slow: SlowArgs {
            rooms: 1,
            members: pick(100, 200) as u32,
            slow: pick(10, 20) as u32,
            rate: 400.0,
            duration_ms: 20_000,
            text_bytes: 480,
            slow_rcvbuf: 4096,
        },
        floor_reference: FloorArgs {
            sockets: floor::REFERENCE_SOCKETS,
            ..floor.clone()
        },
        floor,
        connect_rate: pick(2000, 3000) as f64,
    })
}

/// Today's date (UTC) as YYYY-MM-DD, from the civil-from-days algorithm.
fn today() -> String {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The headline figures per scenario: (JSON path, label, whether higher is better).
fn headlines(scenario: &str) -> Vec<(&'static str, &'static str, bool)> {
    match scenario {
        "idle" => vec![
            (
                "relay_bytes_per_idle_conn",
                "RSS per idle connection (bytes)",
                false,
            ),
            ("connect_latency.p99_ms", "connect p99 (ms)", false),
            (
                "relay_cpu_us_per_connect",
                "relay CPU per connect (us)",
                false,
            ),
        ],
        "fanout" | "hot" => vec![
            (
                "relay_cpu_us_per_delivery",
                "relay CPU per delivery (us)",
                false,
            ),
            ("delivered_share", "delivered share", true),
            ("latency.p50_ms", "latency p50 (ms)", false),
            ("latency.p99_ms", "latency p99 (ms)", false),
            ("latency.p999_ms", "latency p99.9 (ms)", false),
            ("latency.max_ms", "latency max (ms)", false),
            ("relay_writes_per_frame", "relay writes per frame", false),
            (
                "client_cpu_us_per_delivery",
                "client CPU per delivery (us)",
                false,
            ),
        ],
        "handshake" => vec![
            ("handshakes_per_s", "handshakes/s", true),
            (
                "relay_cpu_us_per_handshake",
                "relay CPU per handshake (us)",
                false,
            ),
            ("latency.p99_ms", "handshake p99 (ms)", false),
        ],
        "saturate" => vec![(
            "max_sustained_deliveries_per_s",
            "max sustained deliveries/s",
            true,
        )],
        "churn" => vec![
            ("rss_end_over_reference", "RSS end / steady", false),
            (
                "rss_end_over_first_wave",
                "RSS end / after first wave",
                false,
            ),
            ("relay_rss_peak_kb", "RSS peak (KiB)", false),
            (
                "steady_latency.p99_ms",
                "steady p99 during churn (ms)",
                false,
            ),
        ],
        "slow" => vec![
            (
                "without_slow_latency.p99_ms",
                "healthy p99 without slow (ms)",
                false,
            ),
            (
                "with_slow_latency.p99_ms",
                "healthy p99 with slow (ms)",
                false,
            ),
            (
                "with_slow_delivered_share",
                "healthy delivered share with slow",
                true,
            ),
            (
                "relay_rss_peak_slow_phase_kb",
                "RSS peak in slow phase (KiB)",
                false,
            ),
        ],
        "floor" => vec![
            ("floor_us_per_send", "CPU per send, 1/write (us)", false),
            (
                "floor_us_per_frame_batched",
                "CPU per frame, batched (us)",
                false,
            ),
        ],
        _ => vec![],
    }
}

fn lookup(v: &Value, path: &str) -> Option<f64> {
    let mut cur = v;
    for part in path.split('.') {
        cur = cur.get(part)?;
    }
    cur.as_f64()
}

fn write_json(dir: &Path, name: &str, v: &Value) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join(format!("{name}.json")),
        format!("{}\n", serde_json::to_string_pretty(v)?),
    )?;
    Ok(())
}

pub fn run(a: &CompareArgs, c: &Common, relay_bin: Option<&Path>) -> anyhow::Result<()> {
    let p = preset(&a.size)?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| relay::repo_root().join("loadtest/results").join(today()));
    let relays: Vec<RelayKind> = a
        .relays
        .split(',')
        .map(|s| match s.trim() {
            "roomcast" => Ok(RelayKind::Roomcast),
            "node" | "node-ws" => Ok(RelayKind::Node),
            o => Err(anyhow::anyhow!("unknown relay {o}")),
        })
        .collect::<Result<_, _>>()?;
    let c = Common {
        connect_rate: p.connect_rate.min(c.connect_rate.max(p.connect_rate)),
        ..c.clone()
    };
    let mut results: Vec<(String, String, Value)> = Vec::new();
    for scenario in a
        .scenarios
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        if scenario == "floor" {
            // At the fan-out's connection count, then (unless that is it) over the reference
            // 100 sockets.
            let v = floor::floor(&p.floor)?.print();
            write_json(&out, &format!("floor-{}", a.size), &v)?;
            results.push(("floor".into(), "machine".into(), v));
            if p.floor_reference.sockets != p.floor.sockets {
                let v = floor::floor(&p.floor_reference)?.print();
                write_json(
                    &out,
                    &format!("floor-{}-{}", p.floor_reference.sockets, a.size),
                    &v,
                )?;
                results.push(("floor".into(), "reference".into(), v));
            }
            continue;
        }
        for &kind in &relays {
            // roomcast's relay_bin only applies to roomcast; node uses `node` from PATH.
            let bin = if kind == RelayKind::Roomcast {
                relay_bin
            } else {
                None
            };
            let (spawned, t) = relay::spawn(kind, bin, &[])?;
            eprintln!(
                "compare: {scenario} against {} (pid {})",
                t.name,
                spawned.child.id()
            );
            let report = match scenario {
                "idle" => idle(&t, &c, &p.idle),
                "fanout" => fanout(&t, &c, &p.fanout),
                "hot" => fanout(&t, &c, &p.hot).map(|mut r| {
                    r.scenario = "hot".into();
                    r.json.insert("scenario".into(), json!("hot"));
                    r
                }),
                "handshake" => handshake(&t, &c, &p.handshake),
                "saturate" => saturate(&t, &c, &p.saturate),
                "churn" => churn(&t, &c, &p.churn),
                "slow" => slow(&t, &c, &p.slow),
                other => Err(anyhow::anyhow!("unknown scenario {other}")),
            };
            drop(spawned);
            let v = match report {
                Ok(mut r) => r.print(),
                Err(e) => {
                    eprintln!("compare: {scenario} against {} failed: {e:#}", t.name);
                    json!({"scenario": scenario, "relay": t.name, "error": format!("{e:#}")})
                }
            };
            write_json(&out, &format!("{scenario}-{}-{}", t.name, a.size), &v)?;
            results.push((scenario.to_owned(), t.name.clone(), v));
            // Let TIME_WAIT sockets and the other relay's memory settle between runs.
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
    }
    let summary = summarize(&results);
    write_json(&out, &format!("summary-{}", a.size), &summary)?;
    eprintln!("compare: raw JSON in {}", out.display());
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

/// One measured floor: its socket count and its figures.
struct Floor<'a> {
    sockets: u64,
    v: &'a Value,
}

impl Floor<'_> {
    fn send(&self) -> Option<f64> {
        lookup(self.v, "floor_us_per_send")
    }

    fn summary(&self) -> Value {
        json!({
            "sockets": self.sockets,
            "floor_us_per_send": self.send(),
            "floor_us_per_frame_batched": lookup(self.v, "floor_us_per_frame_batched"),
        })
    }
}

fn summarize(results: &[(String, String, Value)]) -> Value {
    let floor_of = |which: &str| {
        results
            .iter()
            .find(|r| r.0 == "floor" && r.1 == which)
            .map(|r| Floor {
                sockets: lookup(&r.2, "sockets").unwrap_or(0.0) as u64,
                v: &r.2,
            })
    };
    // The floor at the fan-out's connection count, then the 100-socket reference.
    let floors: Vec<(&str, Floor)> = [
        ("", floor_of("machine")),
        ("_reference", floor_of("reference")),
    ]
    .into_iter()
    .filter_map(|(suffix, f)| f.map(|f| (suffix, f)))
    .collect();
    let show = |v: Option<f64>| v.map(format_float).unwrap_or_else(|| "-".into());
    // The ratio column stays blank where there is no roomcast / node-ws ratio to show.
    let line = |scenario: &str, label: &str, rc: Option<f64>, nd: Option<f64>, ratio: &str| {
        println!(
            "  {:<10} {:<42} {:>12} {:>12} {:>8}",
            scenario,
            label,
            show(rc),
            show(nd),
            ratio
        );
    };
    let mut rows = Vec::new();
    println!();
    println!("== compare: roomcast vs node-ws (ratio = roomcast / node-ws) ==");
    println!(
        "  {:<10} {:<42} {:>12} {:>12} {:>8}",
        "scenario", "figure", "roomcast", "node-ws", "ratio"
    );
    let mut seen = Vec::new();
    for (scenario, _, _) in results {
        if seen.contains(scenario) {
            continue;
        }
        seen.push(scenario.clone());
        if scenario == "floor" {
            // The machine's own figures, one block per socket count, in the roomcast column.
            for (_, f) in &floors {
                for (path, label, higher_better) in headlines(scenario) {
                    let v = lookup(f.v, path);
                    let label = format!("{label} @{} sockets", f.sockets);
                    line(scenario, &label, v, None, "");
                    rows.push(json!({"scenario": scenario, "sockets": f.sockets, "figure": path,
                                     "label": label, "machine": v, "higher_is_better": higher_better}));
                }
            }
            continue;
        }
        let get = |relay: &str| {
            results
                .iter()
                .find(|r| &r.0 == scenario && r.1 == relay)
                .map(|r| &r.2)
        };
        for (path, label, higher_better) in headlines(scenario) {
            let rc = get("roomcast").and_then(|v| lookup(v, path));
            let nd = get("node-ws").and_then(|v| lookup(v, path));
            let ratio = match (rc, nd) {
                (Some(a), Some(b)) if b != 0.0 => Some(a / b),
                _ => None,
            };
            line(scenario, label, rc, nd, &show(ratio));
            rows.push(json!({"scenario": scenario, "figure": path, "label": label, "roomcast": rc, "node_ws": nd,
                             "ratio": ratio, "higher_is_better": higher_better}));
        }
        if scenario == "fanout" || scenario == "hot" {
            // Relay CPU per delivery over the floor: first the floor at the fan-out's socket
            // count (the fair yardstick for `fanout`), then the 100-socket reference.
            let conns = get("roomcast")
                .or_else(|| get("node-ws"))
                .and_then(|v| Some(lookup(v, "rooms")? * lookup(v, "members")?));
            for (suffix, f) in &floors {
                let Some(fl) = f.send().filter(|&x| x > 0.0) else {
                    continue;
                };
                let over = |relay: &str| {
                    get(relay)
                        .and_then(|v| lookup(v, "relay_cpu_us_per_delivery"))
                        .map(|v| v / fl)
                };
                let (rc, nd) = (over("roomcast"), over("node-ws"));
                let label = format!("CPU per delivery / floor @{} sockets", f.sockets);
                line(scenario, &label, rc, nd, "");
                rows.push(json!({"scenario": scenario, "figure": format!("relay_cpu_per_delivery_over_floor{suffix}"),
                                 "label": label, "roomcast": rc, "node_ws": nd, "floor_sockets": f.sockets,
                                 "floor_us_per_send": fl, "scenario_connections": conns}));
            }
        }
    }
    json!({
        "scenario": "compare",
        "date": today(),
        "floor": floors.iter().find(|f| f.0.is_empty()).map(|f| f.1.summary()),
        "floor_reference": floors.iter().find(|f| !f.0.is_empty()).map(|f| f.1.summary()),
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_follows_the_fanout_size() {
        for size in ["small", "full"] {
            let p = preset(size).unwrap();
            assert_eq!(
                p.floor.sockets,
                p.fanout.rooms as usize * p.fanout.members as usize
            );
            assert_eq!(p.floor_reference.sockets, floor::REFERENCE_SOCKETS);
        }
        assert_eq!(preset("full").unwrap().floor.sockets, 10_000);
    }

    #[test]
    fn summary_reads_fanout_against_both_floors() {
        let floor_at = |n: u64, send: f64| {
            json!({"scenario": "floor", "sockets": n, "floor_us_per_send": send,
                   "floor_us_per_frame_batched": send / 3.0})
        };
        let fan = |cpu: f64| {
            json!({"scenario": "fanout", "rooms": 100, "members": 100,
                   "relay_cpu_us_per_delivery": cpu})
        };
        let results = vec![
            (
                "floor".to_owned(),
                "machine".to_owned(),
                floor_at(10_000, 8.0),
            ),
            (
                "floor".to_owned(),
                "reference".to_owned(),
                floor_at(100, 4.0),
            ),
            ("fanout".to_owned(), "roomcast".to_owned(), fan(16.0)),
            ("fanout".to_owned(), "node-ws".to_owned(), fan(40.0)),
        ];
        let s = summarize(&results);
        assert_eq!(s["floor"]["sockets"], 10_000);
        assert_eq!(s["floor_reference"]["sockets"], 100);
        let rows = s["rows"].as_array().unwrap();
        let row = |figure: &str| {
            rows.iter()
                .find(|r| r["scenario"] == "fanout" && r["figure"] == figure)
                .unwrap()
        };
        let m = row("relay_cpu_per_delivery_over_floor");
        assert_eq!(m["floor_sockets"], 10_000);
        assert_eq!(m["roomcast"], 2.0);
        assert_eq!(m["node_ws"], 5.0);
        assert_eq!(m["scenario_connections"], 10_000.0);
        let r = row("relay_cpu_per_delivery_over_floor_reference");
        assert_eq!(r["floor_sockets"], 100);
        assert_eq!(r["roomcast"], 4.0);
        let floor_rows = rows.iter().filter(|r| r["scenario"] == "floor").count();
        assert_eq!(floor_rows, 4);
    }
}
