//! How results are shown: a readable table on stdout, then one JSON line with every figure, so
//! a person reads the table and a script (or `compare`) reads the last line.

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

use crate::relay::{self, Target};
use crate::sys::{self, ProcSample};

pub struct Report {
    pub scenario: String,
    rows: Vec<(String, String)>,
    pub json: Map<String, Value>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(scenario: &str, target: &Target) -> Self {
        let mut json = Map::new();
        json.insert("scenario".into(), json!(scenario));
        json.insert("relay".into(), json!(target.name));
        json.insert("addr".into(), json!(target.addr.to_string()));
        json.insert("relay_pid".into(), json!(target.pid));
        if !target.nodes.is_empty() {
            json.insert("nodes".into(), json!(target.nodes.len()));
            json.insert("redis_servers".into(), json!(target.backing.len()));
        }
        json.insert("loadavg_at_start".into(), json!(loadavg()));
        Report {
            scenario: scenario.into(),
            rows: Vec::new(),
            json,
            notes: Vec::new(),
        }
    }

    pub fn bare(scenario: &str) -> Self {
        let mut json = Map::new();
        json.insert("scenario".into(), json!(scenario));
        json.insert("loadavg_at_start".into(), json!(loadavg()));
        Report {
            scenario: scenario.into(),
            rows: Vec::new(),
            json,
            notes: Vec::new(),
        }
    }

    /// A figure: `key` in the JSON, `label` in the table.
    pub fn put(&mut self, key: &str, label: &str, value: Value) {
        let shown = match &value {
            Value::Null => "n/a".to_owned(),
            Value::Number(n) => match n.as_f64() {
                Some(f) if n.is_f64() => format_float(f),
                _ => n.to_string(),
            },
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        self.rows.push((label.to_owned(), shown));
        self.json.insert(key.to_owned(), value);
    }

    pub fn num(&mut self, key: &str, label: &str, v: f64) {
        let v = if v.is_finite() {
            json!(round3(v))
        } else {
            Value::Null
        };
        self.put(key, label, v);
    }

    pub fn opt(&mut self, key: &str, label: &str, v: Option<f64>) {
        match v {
            Some(v) => self.num(key, label, v),
            None => self.put(key, label, Value::Null),
        }
    }

    pub fn int(&mut self, key: &str, label: &str, v: u64) {
        self.put(key, label, json!(v));
    }

    pub fn counts(&mut self, key: &str, label: &str, m: &BTreeMap<String, u64>) {
        let v = serde_json::to_value(m).unwrap_or(Value::Null);
        let shown = if m.is_empty() {
            "none".to_owned()
        } else {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        self.rows.push((label.to_owned(), shown));
        self.json.insert(key.to_owned(), v);
    }

    /// Percentiles of a microsecond histogram, shown in milliseconds.
    pub fn latency(&mut self, key: &str, label: &str, h: &Histogram<u64>) {
        if h.is_empty() {
            self.put(key, label, Value::Null);
            return;
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let v = json!({
            "count": h.len(),
            "p50_ms": round3(ms(0.5)),
            "p90_ms": round3(ms(0.9)),
            "p99_ms": round3(ms(0.99)),
            "p999_ms": round3(ms(0.999)),
            "max_ms": round3(h.max() as f64 / 1000.0),
            "mean_ms": round3(h.mean() / 1000.0),
        });
        let shown = format!(
            "p50 {} | p90 {} | p99 {} | p99.9 {} | max {} ms  (n={})",
            format_float(ms(0.5)),
            format_float(ms(0.9)),
            format_float(ms(0.99)),
            format_float(ms(0.999)),
            format_float(h.max() as f64 / 1000.0),
            h.len()
        );
        self.rows.push((label.to_owned(), shown));
        self.json.insert(key.to_owned(), v);
    }

    pub fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }

    /// Prints the table, then the JSON line last.
    pub fn print(&mut self) -> Value {
        if !self.notes.is_empty() {
            self.json.insert("notes".into(), json!(self.notes));
        }
        let relay = self
            .json
            .get("relay")
            .and_then(Value::as_str)
            .unwrap_or("-")
            .to_owned();
        println!();
        println!("== {} ({}) ==", self.scenario, relay);
        let width = self.rows.iter().map(|(l, _)| l.len()).max().unwrap_or(10);
        for (l, v) in &self.rows {
            println!("  {l:<width$}  {v}");
        }
        for n in &self.notes {
            println!("  note: {n}");
        }
        let v = Value::Object(self.json.clone());
        println!(
            "{}",
            serde_json::to_string(&v).expect("a JSON value serialises")
        );
        v
    }
}

/// The machine's 1-minute load average: on a shared 2-core machine, figures taken while it is
/// well above the harness's own load are noisy, so every result records it.
pub fn loadavg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

pub fn format_float(f: f64) -> String {
    if f.abs() >= 100.0 {
        format!("{f:.0}")
    } else if f.abs() >= 10.0 {
        format!("{f:.1}")
    } else {
        format!("{f:.2}")
    }
}

/// The relay's CPU, memory and counters at one moment: summed over every node of a multi-node
/// target, with the Redis servers it leans on measured beside it.
#[derive(Clone)]
pub struct RelayPoint {
    pub proc_: Option<ProcSample>,
    pub metrics: Option<BTreeMap<String, f64>>,
    /// The Redis servers' CPU and RSS, summed (None without any).
    pub backing: Option<ProcSample>,
}

/// Sums process samples; None when there is none, or one could not be read (it is gone).
fn sum_samples(pids: impl Iterator<Item = u32>) -> Option<ProcSample> {
    let mut total = ProcSample {
        syscw: Some(0),
        ..ProcSample::default()
    };
    let mut any = false;
    for pid in pids {
        let s = sys::sample_process(pid)?;
        any = true;
        total.cpu_us += s.cpu_us;
        total.rss_kb += s.rss_kb;
        total.anon_kb += s.anon_kb;
        total.syscw = total.syscw.zip(s.syscw).map(|(a, b)| a + b);
    }
    any.then_some(total)
}

impl RelayPoint {
    pub fn take(target: &Target, with_metrics: bool) -> Self {
        let metrics = if with_metrics {
            let mut all = BTreeMap::new();
            let mut ok = true;
            for addr in target.addrs() {
                match relay::metrics(addr) {
                    Some(m) => {
                        for (k, v) in m {
                            *all.entry(k).or_insert(0.0) += v;
                        }
                    }
                    None => ok = false,
                }
            }
            ok.then_some(all)
        } else {
            None
        };
        RelayPoint {
            proc_: sum_samples(target.pids().into_iter()),
            metrics,
            backing: sum_samples(target.backing.iter().map(|b| b.pid)),
        }
    }

    pub fn rss_kb(&self) -> Option<u64> {
        self.proc_.map(|p| p.rss_kb)
    }

    pub fn anon_kb(&self) -> Option<u64> {
        self.proc_.map(|p| p.anon_kb)
    }

    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics.as_ref().and_then(|m| m.get(name).copied())
    }
}

/// What the relay spent between two points.
pub struct RelaySpend {
    pub cpu_us: Option<u64>,
    /// The Redis servers' CPU over the same time.
    pub backing_cpu_us: Option<u64>,
    pub syscw: Option<u64>,
    pub socket_writes: Option<f64>,
    pub frames_delivered: Option<f64>,
}

pub fn spend(a: &RelayPoint, b: &RelayPoint) -> RelaySpend {
    let d = |n: &str| Some(b.metric(n)? - a.metric(n)?);
    RelaySpend {
        cpu_us: match (a.proc_, b.proc_) {
            (Some(x), Some(y)) => Some(y.cpu_us.saturating_sub(x.cpu_us)),
            _ => None,
        },
        backing_cpu_us: match (a.backing, b.backing) {
            (Some(x), Some(y)) => Some(y.cpu_us.saturating_sub(x.cpu_us)),
            _ => None,
        },
        syscw: match (a.proc_.and_then(|p| p.syscw), b.proc_.and_then(|p| p.syscw)) {
            (Some(x), Some(y)) => Some(y.saturating_sub(x)),
            _ => None,
        },
        socket_writes: d("roomcast_socket_writes_total"),
        frames_delivered: d("roomcast_frames_delivered_total"),
    }
}
