//! A real Prometheus scrapes a live relay.
//!
//! - `promtool check metrics` (Prometheus' own linter) must accept the relay's `/metrics` text.
//! - `/usr/bin/prometheus` (Debian package `prometheus`) is started on a free port with a
//!   generated config (scrape interval 1s) and a temporary TSDB; the test then queries its HTTP
//!   API until `roomcast_connections` for this relay appears, checks the histogram and process
//!   series were ingested, and evaluates every PromQL expression of the Grafana dashboard there.
//!
//! Nothing is skipped: without the binaries these tests FAIL, saying what to install.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";

fn require(bin: &str) {
    assert!(
        std::path::Path::new(bin).exists(),
        "{bin} is missing: this test runs a real Prometheus. Install it with `apt-get install -y prometheus` \
         (Debian/Ubuntu package `prometheus`, which provides /usr/bin/prometheus and /usr/bin/promtool); CI installs it."
    );
}

/// A Prometheus server child; killed on drop (its storage dir goes with the TempDir).
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: CapturedLines,
    _dir: TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        require(PROMETHEUS);
        let dir = TempDir::new("roomcast-prometheus");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: roomcast\n    metrics_path: /metrics\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let storage = dir.path().join("data");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut cmd = Command::new(PROMETHEUS);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", storage.display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--storage.tsdb.retention.time=1h")
            .arg("--log.level=warn")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = spawn_tied(cmd, libc::SIGKILL)
            .unwrap_or_else(|e| panic!("cannot start {PROMETHEUS}: {e}"));
        let log = CapturedLines::capture(child.stderr.take().expect("stderr"));
        Prometheus {
            child,
            addr,
            log,
            _dir: dir,
        }
    }

    fn logs(&self) -> String {
        self.log.text()
    }

    async fn get(&self, path: &str) -> Option<HttpResponse> {
        http_exchange_within(self.addr, &get_request(self.addr, path, &[]), WAIT)
            .await
            .ok()
    }

    /// `GET /api/v1/query?query=...` -> the parsed JSON answer.
    async fn query(&mut self, promql: &str) -> Value {
        let q: String = url::form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        let resp = self
            .get(&format!("/api/v1/query?query={q}"))
            .await
            .unwrap_or_else(|| panic!("Prometheus API unreachable\n{}", self.logs()));
        serde_json::from_str(&resp.body).unwrap_or_else(|e| {
            panic!(
                "query {promql:?}: HTTP {}, not JSON ({e}): {}",
                resp.status, resp.body
            )
        })
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "Prometheus exited with {status} before becoming ready:\n{}",
                    self.logs()
                );
            }
            if self.get("/-/ready").await.is_some_and(|r| r.status == 200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus not ready within 60 s:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Poll `promql` until it returns at least one sample satisfying `ok`; bounded.
    async fn wait_series(
        &mut self,
        promql: &str,
        within: Duration,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + within;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            let v = self.query(promql).await;
            if v["status"] == "success" {
                if let Some(s) = v["data"]["result"]
                    .as_array()
                    .and_then(|r| r.iter().find(|s| ok(s)))
                {
                    return s.clone();
                }
            }
            last = v;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let targets = self
            .get("/api/v1/targets")
            .await
            .map(|r| r.body)
            .unwrap_or_default();
        panic!("no series for {promql:?} within {within:?}; last answer: {last}\ntargets: {targets}\nPrometheus log:\n{}", self.logs());
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- prometheus log (tail) ----\n{}",
                tail(&self.logs(), 4000)
            );
        }
    }
}

/// Some traffic so that every series, histograms included, has data.
async fn traffic(relay: &Relay) -> Client {
    let (mut a, _) = Client::join_and_greet(relay, "scraped", "prom").await;
    a.publish("hello prometheus").await;
    a.expect_message("hello prometheus").await;
    a.send_text("nope").await;
    a.expect_error("bad_json").await;
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_exposition() {
    require(PROMTOOL);
    let relay = Relay::start(&[("HEARTBEAT_MS", "600000")]);
    let _client = traffic(&relay).await;
    let text = metrics_text(&relay).await;
    let dir = TempDir::new("roomcast-promtool");
    let file = dir.path().join("metrics.txt");
    std::fs::write(&file, &text).expect("write exposition");
    let out = Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).expect("open exposition"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {PROMTOOL}: {e}"));
    assert!(
        out.status.success(),
        "`promtool check metrics` rejected the relay's /metrics ({}):\nstdout: {}\nstderr: {}\n--- exposition ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_relay_and_evaluates_the_dashboard() {
    require(PROMETHEUS);
    let relay = Relay::start(&[("HEARTBEAT_MS", "600000")]);
    let _client = traffic(&relay).await;
    let mut prom = Prometheus::start(relay.addr);
    prom.wait_ready().await;

    let instance = relay.addr.to_string();
    let within = Duration::from_secs(45);
    let s = prom
        .wait_series("roomcast_connections", within, |s| {
            s["metric"]["instance"] == instance.as_str()
        })
        .await;
    assert_eq!(s["metric"]["job"], "roomcast", "{s}");
    assert_eq!(s["value"][1], "1", "one client is connected: {s}");

    let up = prom
        .wait_series("up{job=\"roomcast\"}", within, |s| {
            s["metric"]["instance"] == instance.as_str()
        })
        .await;
    assert_eq!(up["value"][1], "1", "the scrape target must be up: {up}");
    for series in [
        "roomcast_messages_received_total",
        "roomcast_publish_recipients_bucket",
        "roomcast_publish_to_write_seconds_count",
        "roomcast_connections_closed_total",
        "roomcast_upgrade_rejections_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        prom.wait_series(series, within, |s| {
            s["metric"]["instance"] == instance.as_str()
        })
        .await;
    }
    let m = prom
        .wait_series("roomcast_messages_received_total", within, |_| true)
        .await;
    assert_eq!(m["value"][1], "2", "messages received as scraped: {m}");

    // Every dashboard expression is valid PromQL for this Prometheus and, once two scrapes exist,
    // the ones that select this relay's series return data.
    let dashboard = load_dashboard();
    let exprs = dashboard_exprs(&dashboard);
    assert!(!exprs.is_empty());
    // Rate windows need at least two scrapes inside them.
    prom.wait_series("count_over_time(roomcast_connections[1m])", within, |s| {
        s["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            >= 3.0
    })
    .await;
    let mut problems = Vec::new();
    for (panel, expr) in &exprs {
        let q = expr
            .replace("$__rate_interval", "10s")
            .replace("$__interval", "2s")
            .replace("$__range", "1m")
            .replace("$instance", ".*")
            .replace("$job", ".*");
        let v = prom.query(&q).await;
        if v["status"] != "success" {
            problems.push(format!(
                "panel {panel:?}: {q}\n    -> {} {}",
                v["errorType"], v["error"]
            ));
            continue;
        }
        let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
        // Ratios of rates may be empty or NaN on an idle relay; plain selectors must not be empty.
        let has_division = q.contains(" / ");
        if result.is_empty() && !has_division {
            problems.push(format!(
                "panel {panel:?}: {q}\n    -> no data from a scraped relay"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "dashboard expressions failed against a real Prometheus:\n  {}",
        problems.join("\n  ")
    );
}
