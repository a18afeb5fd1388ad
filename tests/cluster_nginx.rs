//! Three relay nodes behind a real nginx (least_conn, as deploy/nginx.conf) sharing a real
//! redis-server: a rolling restart, and a node killed with SIGKILL, lose nothing. Clients
//! reconnect through nginx the way the bundled client does (with `since`, `epoch` and their
//! `session`) and publishers retry unacknowledged messages with the same `requestId`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

const ROOMS: usize = 5;
const PER_ROOM: usize = 6;

struct Cluster {
    _redis: RedisServer,
    nginx: Nginx,
    ports: Vec<u16>,
    nodes: Vec<Option<Relay>>,
    envs: Vec<(String, String)>,
}

impl Cluster {
    async fn start() -> Cluster {
        let redis = RedisServer::start();
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let nginx = Nginx::start(&ports);
        let envs = vec![
            ("REDIS_URL".to_string(), redis.url()),
            ("ALLOWED_ORIGINS".to_string(), nginx.origin()),
            ("TRUSTED_PROXIES".to_string(), "127.0.0.1".to_string()),
            ("RATE_LIMIT".to_string(), "100000".to_string()),
            ("PUBLISH_RATE_PER_ADDRESS".to_string(), "0".to_string()),
            ("SHUTDOWN_DRAIN_MS".to_string(), "3000".to_string()),
        ];
        let mut cluster = Cluster {
            _redis: redis,
            nginx,
            ports,
            nodes: Vec::new(),
            envs,
        };
        for i in 0..3 {
            let node = cluster.start_node(i).await;
            cluster.nodes.push(Some(node));
        }
        cluster
    }

    async fn start_node(&self, i: usize) -> Relay {
        let mut b = Relay::builder().env("PORT", self.ports[i]);
        for (k, v) in &self.envs {
            b = b.env(k, v);
        }
        let relay = b.start();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while http_get(&relay, "/readyz", &[]).await.status != 200 {
            assert!(tokio::time::Instant::now() < deadline, "node {i} not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        relay
    }
}

/// What one simulated client saw and (for a publisher) had acknowledged.
#[derive(Debug, Default)]
struct Seen {
    name: String,
    room: String,
    /// (seq, text) in the order received, history included.
    messages: Vec<(u64, String)>,
    /// Texts whose publish was acknowledged.
    acked: BTreeSet<String>,
    reconnects: usize,
    incomplete_resumes: usize,
}

/// A client that stays in `room` through nginx until `stop`, reconnecting with resume, and (if
/// `publisher`) publishing a numbered message every 50 ms, retrying unacked ones after a
/// reconnect with the same requestId.
async fn client(
    port: u16,
    origin: String,
    name: String,
    room: String,
    publisher: bool,
    publishing: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Seen {
    let mut seen = Seen {
        name: name.clone(),
        room: room.clone(),
        ..Seen::default()
    };
    let mut session: Option<String> = None;
    let mut resume: Option<(u64, String)> = None;
    let mut next = 0usize;
    let mut unacked: BTreeMap<String, String> = BTreeMap::new();
    let mut first = true;
    while !stop.load(Ordering::Acquire) {
        let mut query = format!("token={}&name={name}&room={room}", encode(TOKEN));
        if let Some(s) = &session {
            query.push_str(&format!("&session={s}"));
        }
        if let Some((since, epoch)) = &resume {
            query.push_str(&format!("&since={since}&epoch={epoch}"));
        }
        let mut request = format!("ws://127.0.0.1:{port}/chat?{query}")
            .into_client_request()
            .expect("request");
        request
            .headers_mut()
            .insert("Origin", HeaderValue::from_str(&origin).expect("origin"));
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(3),
            tokio_tungstenite::connect_async(request),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if !first {
            seen.reconnects += 1;
        }
        first = false;
        // Messages the last connection never got an answer for go again, same requestId.
        for (rid, text) in &unacked {
            let m = json!({"type":"message","text":text,"requestId":rid}).to_string();
            let _ = ws.send(Message::text(m)).await;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                frame = ws.next() => {
                    let Some(Ok(frame)) = frame else { break };
                    let Message::Text(t) = frame else { continue };
                    let e: Value = serde_json::from_str(&t).expect("json");
                    match e["type"].as_str() {
                        Some("system") => session = e["session"].as_str().map(str::to_string),
                        Some("history") => {
                            if resume.is_some() && e["complete"] != true {
                                seen.incomplete_resumes += 1;
                            }
                            let epoch = e["epoch"].as_str().unwrap_or("").to_string();
                            for m in e["messages"].as_array().into_iter().flatten() {
                                let seq = m["seq"].as_u64().unwrap_or(0);
                                seen.messages.push((seq, m["text"].as_str().unwrap_or("").into()));
                            }
                            let last = seen.messages.last().map_or(0, |(s, _)| *s);
                            resume = Some((last, epoch));
                        }
                        Some("message") => {
                            let m = &e["message"];
                            let seq = m["seq"].as_u64().unwrap_or(0);
                            seen.messages.push((seq, m["text"].as_str().unwrap_or("").into()));
                            if let Some((since, _)) = &mut resume {
                                *since = seq;
                            }
                        }
                        Some("ack") => {
                            let rid = e["requestId"].as_str().unwrap_or("").to_string();
                            if let Some(text) = unacked.remove(&rid) {
                                seen.acked.insert(text);
                            }
                        }
                        _ => {}
                    }
                }
                _ = tick.tick() => {
                    if stop.load(Ordering::Acquire) {
                        let _ = ws.close(None).await;
                        return seen;
                    }
                    if publisher && publishing.load(Ordering::Acquire) {
                        let rid = format!("{name}-{next}");
                        let text = format!("{room} {name} #{next}");
                        next += 1;
                        unacked.insert(rid.clone(), text.clone());
                        let m = json!({"type":"message","text":text,"requestId":rid}).to_string();
                        if ws.send(Message::text(m)).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
    }
    seen
}

/// Every client saw every message of its room exactly once, in seq order (no gap, no repeat),
/// every resume was complete, and every acknowledged publish reached everyone in its room.
fn check(all: &[Seen]) {
    let mut acked_by_room: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for s in all {
        for t in &s.acked {
            acked_by_room.entry(&s.room).or_default().insert(t);
        }
    }
    for s in all {
        let seqs: Vec<u64> = s.messages.iter().map(|(q, _)| *q).collect();
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(
            seqs, expected,
            "{} in {}: every message once, in seq order",
            s.name, s.room
        );
        assert_eq!(
            s.incomplete_resumes, 0,
            "{}: a resume was incomplete",
            s.name
        );
        let texts: BTreeSet<&str> = s.messages.iter().map(|(_, t)| t.as_str()).collect();
        for acked in acked_by_room.get(s.room.as_str()).into_iter().flatten() {
            assert!(
                texts.contains(acked),
                "{} in {} never got the acknowledged {acked:?}",
                s.name,
                s.room
            );
        }
    }
    let acked: usize = acked_by_room.values().map(BTreeSet::len).sum();
    assert!(
        acked >= ROOMS * 10,
        "publishers got too few acks to mean anything: {acked}"
    );
}

async fn run_clients(
    cluster: &Cluster,
    publishing: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Seen>> {
    let mut tasks = Vec::new();
    for r in 0..ROOMS {
        for c in 0..PER_ROOM {
            tasks.push(tokio::spawn(client(
                cluster.nginx.port(),
                cluster.nginx.origin(),
                format!("r{r}c{c}"),
                format!("roll{r}"),
                c == 0,
                publishing.clone(),
                stop.clone(),
            )));
        }
    }
    // Everyone is in before anyone publishes, so every client's view starts at seq 1.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    publishing.store(true, Ordering::Release);
    tasks
}

async fn finish(
    tasks: Vec<tokio::task::JoinHandle<Seen>>,
    publishing: &AtomicBool,
    stop: &AtomicBool,
) -> Vec<Seen> {
    publishing.store(false, Ordering::Release);
    // Let retries and deliveries settle, then stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Release);
    let mut all = Vec::new();
    for t in tasks {
        all.push(
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("client stops")
                .expect("client task"),
        );
    }
    all
}

/// A running cluster with every client in and publishing for a second already.
async fn start_with_clients() -> (
    Cluster,
    Arc<AtomicBool>,
    Arc<AtomicBool>,
    Vec<tokio::task::JoinHandle<Seen>>,
) {
    let cluster = Cluster::start().await;
    let (publishing, stop) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let tasks = run_clients(&cluster, publishing.clone(), stop.clone()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    (cluster, publishing, stop, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_behind_nginx_loses_nothing() {
    let (mut cluster, publishing, stop, tasks) = start_with_clients().await;
    for i in 0..3 {
        let mut node = cluster.nodes[i].take().expect("running");
        let (status, _) = node.stop_with_sigterm(Duration::from_secs(10)).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "node {i} drains and exits 0"
        );
        drop(node);
        let node = cluster.start_node(i).await;
        cluster.nodes[i] = Some(node);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let all = finish(tasks, &publishing, &stop).await;
    check(&all);
    let reconnects: usize = all.iter().map(|s| s.reconnects).sum();
    assert!(
        reconnects >= ROOMS * PER_ROOM,
        "every client went through at least one restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_with_sigkill_loses_nothing() {
    let (mut cluster, publishing, stop, tasks) = start_with_clients().await;
    let mut victim = cluster.nodes[1].take().expect("running");
    victim.signal(libc::SIGKILL);
    let _ = victim.wait_for_exit(Duration::from_secs(5)).await;
    drop(victim);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = finish(tasks, &publishing, &stop).await;
    check(&all);
    let reconnects: usize = all.iter().map(|s| s.reconnects).sum();
    assert!(
        reconnects > 0,
        "the killed node's clients came back elsewhere"
    );
}
