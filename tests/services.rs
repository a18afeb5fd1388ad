//! The harness's real services work: redis-server answers and restarts empty on its port, one
//! shared redis-server per test binary dies with the binary, nginx proxies plain HTTP and
//! WebSocket joins to relays and follows a reload of its upstreams, and a relay restarts on its
//! port after SIGTERM (a rolling restart behind nginx).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Relays behind one nginx must all accept the proxy's Origin (each node's default allow-list
/// names only its own port).
fn nodes_behind(origin: &str) -> RelayBuilder {
    Relay::builder().env("ALLOWED_ORIGINS", origin)
}

/// The defect: ports came from port 0, so from the kernel's ephemeral range, and a server
/// restarted on its port could find it taken meanwhile as some connection's source port.
#[test]
fn free_ports_are_below_the_ephemeral_range_and_never_given_twice() {
    let (low, _) = ephemeral_ports();
    let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
    assert!(ports.iter().all(|&p| p < low), "{ports:?} against {low}");
    let mut unique = ports.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), ports.len(), "a port handed out twice");
}

#[test]
fn redis_answers_ping_and_restarts_empty_on_the_same_port() {
    let mut redis = RedisServer::start();
    assert!(redis.ping(), "a started redis-server answers PING");
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port()));
    assert_eq!(
        redis.command(&["SET", "services:key", "value"]),
        Resp::Simple("OK".into())
    );
    assert_eq!(
        redis.command(&["GET", "services:key"]),
        Resp::Bulk(Some(b"value".to_vec()))
    );

    let (port, pid) = (redis.port(), redis.pid());
    redis.kill_hard();
    assert!(!redis.ping(), "nothing answers after kill_hard");
    assert_eq!(redis.pid(), None);

    redis.restart();
    assert_eq!(redis.port(), port, "restart keeps the port (and the URL)");
    assert_ne!(redis.pid(), pid, "restart is a new process");
    assert!(redis.ping(), "the restarted server answers PING");
    assert_eq!(
        redis.command(&["GET", "services:key"]),
        Resp::Bulk(None),
        "restart empties it"
    );
    assert_eq!(redis.command(&["DBSIZE"]), Resp::Integer(0));
}

#[test]
fn shared_redis_is_one_server_per_test_binary() {
    let (first, second) = (RedisServer::shared(), RedisServer::shared());
    assert!(std::ptr::eq(first, second));
    assert!(first.ping());
    // Tests sharing it keep to their own keys.
    assert_eq!(
        first.command(&["INCR", "services:shared:counter"]),
        Resp::Integer(1)
    );
}

/// Run by `shared_redis_dies_with_the_test_binary` in a child test process.
#[test]
#[ignore = "a helper: run in a child process by shared_redis_dies_with_the_test_binary"]
fn print_the_shared_redis_pid() {
    let redis = RedisServer::shared();
    println!("shared redis pid {}", redis.pid().expect("running"));
}

#[test]
fn shared_redis_dies_with_the_test_binary() {
    let out = Command::new(std::env::current_exe().expect("own path"))
        .args([
            "--ignored",
            "--exact",
            "print_the_shared_redis_pid",
            "--nocapture",
        ])
        .output()
        .expect("run this test binary again");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child test run failed:\n{stdout}");
    let pid: u32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("shared redis pid "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pid in the child's output:\n{stdout}"));
    // The child binary has exited; its redis-server must follow (a zombie waiting for its new
    // parent to reap it counts as gone).
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let state = stat.rsplit_once(") ")?.1.chars().next()?;
                Some(state != 'Z' && state != 'X')
            })
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive() {
        assert!(
            Instant::now() < deadline,
            "the shared redis-server (pid {pid}) outlived its test binary"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_proxies_plain_http_and_a_websocket_join_to_a_relay() {
    let relay = Relay::start(&[]);
    let nginx = Nginx::start(&[relay.port()]);
    assert_eq!(nginx.upstreams(), [relay.port()]);

    let health = http_get(&nginx, "/healthz", &[]).await;
    assert_eq!(health.status, 200, "{}\n{}", health.head, health.body);
    assert_eq!(health.json()["ok"], true, "{}", health.body);

    // The Origin of the relay itself passes through the proxy unchanged.
    let (mut ann, system, history) = Client::join_via(&nginx, &relay, "ann", "proxied").await;
    assert_eq!(system["type"], "system");
    assert_eq!(history["type"], "history");
    let sent = ann.publish_and_wait("through nginx").await;
    assert_message_shape(&sent, "proxied", "ann", "through nginx");
    wait_for_clients(&relay, 1, EVENT_TIMEOUT).await;
    ann.close_normally().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_follows_a_reload_of_its_upstreams() {
    const ORIGIN: &str = "http://cluster.test";
    let nodes = nodes_behind(ORIGIN).start_nodes(2);
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut nginx = Nginx::start(&[a.port()]);
    let path = |name: &str| format!("/chat?{}", a.chat_query(name, "reload"));

    let mut first = Client::connect_to(&nginx, &path("first"), Some(ORIGIN), &[])
        .await
        .expect("upgrade through nginx");
    first.next_event_of_type("history", EVENT_TIMEOUT).await;
    wait_for_clients(a, 1, EVENT_TIMEOUT).await;

    nginx.reload_upstreams(&[b.port()]);
    assert_eq!(nginx.upstreams(), [b.port()]);
    let mut second = Client::connect_to(&nginx, &path("second"), Some(ORIGIN), &[])
        .await
        .expect("upgrade through nginx after the reload");
    second.next_event_of_type("history", EVENT_TIMEOUT).await;
    wait_for_clients(b, 1, EVENT_TIMEOUT).await;
    wait_for_clients(a, 1, EVENT_TIMEOUT).await;

    // A connection proxied before the reload stays up on its node.
    first.publish_and_wait("still on a").await;
    second.publish_and_wait("on b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_restarts_on_its_port_behind_nginx() {
    const ORIGIN: &str = "http://cluster.test";
    let mut nodes = nodes_behind(ORIGIN)
        .env("SHUTDOWN_DRAIN_MS", 500)
        .start_nodes(2);
    let ports: Vec<u16> = nodes.iter().map(Relay::port).collect();
    let nginx = Nginx::start(&ports);

    for node in nodes.iter_mut() {
        let (port, pid) = (node.port(), node.pid());
        let status = node.restart(Duration::from_secs(10)).await;
        assert!(status.success(), "a drained relay exits 0: {status:?}");
        assert_eq!(node.port(), port, "restarted on its port");
        assert_ne!(node.pid(), pid, "a new process");
        assert_eq!(http_get(&*node, "/readyz", &[]).await.status, 200);
    }
    // Both nodes serve through the proxy again.
    let path = format!("/chat?{}", nodes[0].chat_query("after", "restart"));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut c = Client::connect_to(&nginx, &path, Some(ORIGIN), &[])
            .await
            .expect("upgrade through nginx after the restarts");
        c.next_event_of_type("history", EVENT_TIMEOUT).await;
        clients.push(c);
    }
    // least_conn spreads two connections over two idle nodes.
    for node in &nodes {
        wait_for_clients(node, 1, EVENT_TIMEOUT).await;
    }
}
