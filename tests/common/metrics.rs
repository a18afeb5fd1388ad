//! `/metrics`: one parser of the Prometheus text format ([`Exposition`]), and the helpers tests
//! use on top of it — a value by exact label set ([`Exposition::get`]), a sum over every series
//! whose labels include some ([`metric_in`], [`metric`]), and bounded polling
//! ([`wait_for_metric`], [`Relay::wait_metrics`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::http::http_get;
use super::relay::Relay;
use super::tls::https_get;
use super::WAIT;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition: every sample, plus `# TYPE` and `# HELP` per family.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    pub types: HashMap<String, String>,
    pub helps: HashMap<String, String>,
}

impl Exposition {
    pub fn parse(text: &str) -> Result<Exposition, String> {
        let mut e = Exposition::default();
        for (no, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest
                    .split_once(' ')
                    .ok_or(format!("line {}: bad TYPE", no + 1))?;
                e.types.insert(name.to_string(), kind.trim().to_string());
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                e.helps.insert(name.to_string(), help.to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            e.samples
                .push(parse_sample(line).map_err(|m| format!("line {}: {m}: {line:?}", no + 1))?);
        }
        Ok(e)
    }

    /// The value of the sample `name` whose label set is exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// `get`, or 0 when the series is absent.
    pub fn get0(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Sum of every sample `name` whose labels include `labels` (other labels may be present);
    /// None if there is no such sample.
    pub fn sum_matching(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .reduce(|a, b| a + b)
    }

    /// Sum of every sample called `name`, whatever its labels.
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    /// Every sample called `name`.
    pub fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// Every sample name present (with `_bucket`/`_sum`/`_count` as exposed).
    pub fn sample_names(&self) -> BTreeSet<String> {
        self.samples.iter().map(|s| s.name.clone()).collect()
    }

    /// The `(le, cumulative count)` buckets of histogram `name`, sorted by `le`.
    pub fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = self
            .series(&format!("{name}_bucket"))
            .into_iter()
            .filter_map(|s| {
                s.labels
                    .get("le")
                    .map(|le| (parse_value(le).unwrap_or(f64::NAN), s.value))
            })
            .collect();
        v.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
        v
    }

    /// The roomcast_* samples only, one per line (for failure messages).
    pub fn render_roomcast(&self) -> String {
        let mut out = String::new();
        for s in &self.samples {
            if s.name.starts_with("roomcast_") && !s.name.ends_with("_bucket") {
                let labels: Vec<String> = s
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{v}\""))
                    .collect();
                out.push_str(&format!("{}{{{}}} {}\n", s.name, labels.join(","), s.value));
            }
        }
        out
    }
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => v.parse().ok(),
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ', '\t']).ok_or("no value")?;
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if rest.starts_with('{') {
        let bytes = rest.as_bytes();
        let mut i = 1;
        loop {
            while i < bytes.len() && (bytes[i] == b' ' || bytes[i] == b',') {
                i += 1;
            }
            if i >= bytes.len() {
                return Err("unterminated labels".into());
            }
            if bytes[i] == b'}' {
                i += 1;
                break;
            }
            let key_start = i;
            while i < bytes.len() && bytes[i] != b'=' {
                i += 1;
            }
            let key = rest[key_start..i].trim().to_string();
            i += 1;
            if bytes.get(i) != Some(&b'"') {
                return Err("label value not quoted".into());
            }
            i += 1;
            let mut val = String::new();
            loop {
                match bytes.get(i) {
                    None => return Err("unterminated label value".into()),
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        match bytes.get(i + 1) {
                            Some(b'n') => val.push('\n'),
                            Some(b'\\') => val.push('\\'),
                            Some(b'"') => val.push('"'),
                            _ => return Err("bad escape".into()),
                        }
                        i += 2;
                    }
                    Some(_) => {
                        let ch = rest[i..].chars().next().expect("in bounds");
                        val.push(ch);
                        i += ch.len_utf8();
                    }
                }
            }
            labels.insert(key, val);
        }
        rest = &rest[i..];
    }
    let mut parts = rest.split_whitespace();
    let value = parts.next().ok_or("no value")?;
    let value = parse_value(value).ok_or("bad value")?;
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Parse an exposition the relay served; panics (with the text) if it is not valid.
pub fn parse_exposition(text: &str) -> Exposition {
    Exposition::parse(text).unwrap_or_else(|e| panic!("cannot parse /metrics: {e}\n---\n{text}"))
}

/// Sum of every sample of `name` whose labels include `labels`; None if there is none.
pub fn metric_in(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    parse_exposition(text).sum_matching(name, labels)
}

/// The `/metrics` text.
pub async fn metrics_text(relay: &Relay) -> String {
    let resp = match relay.tls_client() {
        Some(client) => https_get(relay, client, "/metrics").await,
        None => http_get(relay, "/metrics", &[]).await,
    };
    assert_eq!(resp.status, 200, "/metrics answered {}", resp.head);
    resp.body
}

/// A metric's value (summed over matching label sets; 0 when absent).
pub async fn metric(relay: &Relay, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_in(&metrics_text(relay).await, name, labels).unwrap_or(0.0)
}

/// Poll `/metrics` until `pred(value)` holds; returns the value. Panics after `timeout`.
pub async fn wait_for_metric(
    relay: &Relay,
    name: &str,
    labels: &[(&str, &str)],
    timeout: Duration,
    pred: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let v = metric(relay, name, labels).await;
        if pred(v) {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("metric {name}{labels:?} is {v}, condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Poll `/healthz` until `clients == n`.
pub async fn wait_for_clients(relay: &Relay, n: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let body = match relay.tls_client() {
            Some(client) => https_get(relay, client, "/healthz").await.json(),
            None => http_get(relay, "/healthz", &[]).await.json(),
        };
        if body["clients"].as_u64() == Some(n) {
            return;
        }
        if Instant::now() >= deadline {
            panic!("/healthz clients did not reach {n} within {timeout:?}; last: {body}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

impl Relay {
    /// Scrape `/metrics` and parse it.
    pub async fn scrape(&self) -> Exposition {
        parse_exposition(&metrics_text(self).await)
    }

    /// Poll `/metrics` until `pred` holds, at most `within`. Returns the last exposition, or
    /// panics with `what` and the last values seen.
    pub async fn wait_metrics(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&Exposition) -> bool,
    ) -> Exposition {
        let deadline = Instant::now() + within;
        loop {
            let e = self.scrape().await;
            if pred(&e) {
                return e;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {within:?} waiting for {what}\nlast /metrics:\n{}",
                    e.render_roomcast()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wait until the `roomcast_connections` gauge equals `n`.
    pub async fn wait_connections(&self, n: f64) -> Exposition {
        self.wait_metrics(&format!("roomcast_connections == {n}"), WAIT, |e| {
            e.get("roomcast_connections", &[]) == Some(n)
        })
        .await
    }
}
