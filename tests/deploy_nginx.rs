//! `deploy/nginx.conf` itself (rendered for local ports the way `deploy/local-cluster.sh` does),
//! in front of real relays: its access log never shows the token (nor any query string), and
//! during a node's lame-duck wait new upgrades through it land on the other node (a 503 is
//! retried there) while the draining node's clients stay connected until LAME_DUCK_MS.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// nginx running a rendered copy of deploy/nginx.conf; stopped on drop.
struct DeployNginx {
    dir: TempDir,
    port: u16,
    child: Child,
}

impl DeployNginx {
    fn start(upstreams: &[u16]) -> DeployNginx {
        let dir = TempDir::new("roomcast-deploy-nginx");
        let port = free_port();
        let config = render(dir.path(), port, upstreams);
        let mut cmd = Command::new(NGINX);
        cmd.arg("-p")
            .arg(format!("{}/", dir.path().display()))
            .arg("-c")
            .arg(&config)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = spawn_tied(cmd, libc::SIGTERM).expect("start nginx");
        let nginx = DeployNginx { dir, port, child };
        let deadline = Instant::now() + SERVICE_STARTUP_TIMEOUT;
        while std::net::TcpStream::connect(nginx.addr()).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx with deploy/nginx.conf did not listen: {}",
                nginx.error_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for DeployNginx {
    fn drop(&mut self) {
        send_signal(self.child.id(), libc::SIGTERM);
        if !wait_for_child(&mut self.child, Duration::from_secs(3)) {
            kill_and_reap(&mut self.child);
        }
    }
}

/// deploy/nginx.conf with this run's ports and every path under `dir`, as local-cluster.sh
/// renders it.
fn render(dir: &Path, port: u16, upstreams: &[u16]) -> PathBuf {
    let deploy = std::fs::read_to_string(repo_root().join("deploy/nginx.conf"))
        .expect("read deploy/nginx.conf");
    let d = dir.display();
    let root = std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || std::fs::read_to_string("/proc/self/status")
            .map(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t")))
            .unwrap_or(false);
    let mut out = format!("daemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n");
    if root {
        // As root the workers would run as `nobody`, whose group Debian does not have.
        out.push_str("user root root;\n");
    }
    for line in deploy.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("server 127.0.0.1:808") {
            continue;
        }
        match trimmed {
            "least_conn;" => {
                out.push_str("        least_conn;\n");
                for p in upstreams {
                    out.push_str(&format!(
                        "        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;\n"
                    ));
                }
            }
            "listen 8080;" => out.push_str(&format!("        listen 127.0.0.1:{port};\n")),
            "http {" => out.push_str(&format!(
                "http {{\n    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n    \
                 fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n"
            )),
            _ => out.push_str(&format!(
                "{}\n",
                line.replace("/var/log/nginx/roomcast-access.log", &format!("{d}/access.log"))
            )),
        }
    }
    assert!(
        out.contains(&format!("{d}/access.log roomcast")),
        "deploy/nginx.conf writes its access log with the roomcast format:\n{out}"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, out).expect("write nginx.conf");
    path
}

#[tokio::test]
async fn the_access_log_of_deploy_nginx_conf_never_shows_the_token() {
    let relay = Relay::start(&[]);
    let nginx = DeployNginx::start(&[relay.port()]);
    let path = format!("/chat?{}", relay.chat_query("ada", "scrubbed"));
    let mut ada = Client::connect_to(&nginx.addr(), &path, Some(&relay.origin()), &[])
        .await
        .unwrap_or_else(|e| panic!("upgrade through nginx: {e:?}\n{}", nginx.error_log()));
    ada.expect_type("system").await;
    ada.close().await;
    let wrong = "/chat?token=wrong-s3cret&name=eve&room=scrubbed";
    let refused = Client::connect_to(&nginx.addr(), wrong, Some(&relay.origin()), &[]).await;
    assert!(
        matches!(refused, Err(ConnectError::Status(401))),
        "{refused:?}"
    );

    // nginx logs an upgraded request when its connection ends.
    let deadline = Instant::now() + WAIT;
    let log = loop {
        let log = nginx.access_log();
        if log.lines().count() >= 2 {
            break log;
        }
        assert!(
            Instant::now() < deadline,
            "access log: {log:?}\n{}",
            nginx.error_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(log.contains("GET /chat room=scrubbed\" 101"), "{log}");
    assert!(log.contains("GET /chat room=scrubbed\" 401"), "{log}");
    for secret in [relay.token.as_str(), "wrong-s3cret", "token=", "name=ada"] {
        assert!(
            !log.contains(secret),
            "the access log shows {secret:?}:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_lame_duck_wait_new_upgrades_through_nginx_land_on_the_other_node() {
    let nginx_port_origin = "ALLOWED_ORIGINS";
    let builder = Relay::builder()
        .env(nginx_port_origin, "*")
        .env("LAME_DUCK_MS", 4000)
        .env("SHUTDOWN_DRAIN_MS", 3000);
    let mut draining = builder.start();
    let staying = builder.start();
    let nginx = DeployNginx::start(&[draining.port(), staying.port()]);
    let path = |name: &str| format!("/chat?{}", draining.chat_query(name, "roll"));

    // Two members on each node (least_conn alternates).
    let mut members = Vec::new();
    for i in 0..4 {
        let mut c = Client::connect_to(
            &nginx.addr(),
            &path(&format!("m{i}")),
            Some(&nginx.origin()),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("member {i}: {e:?}\n{}", nginx.error_log()));
        c.expect_type("system").await;
        members.push(c);
    }
    wait_for_clients(&draining, 2, WAIT).await;

    let signalled = Instant::now();
    draining.signal(libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(2);
    while http_get(&draining, "/readyz", &[]).await.status != 503 {
        assert!(Instant::now() < deadline, "/readyz of the draining node");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // New upgrades through nginx during the lame-duck wait: none is refused.
    for i in 0..10 {
        let mut c = Client::connect_to(
            &nginx.addr(),
            &path(&format!("new{i}")),
            Some(&nginx.origin()),
            &[],
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "upgrade {i} through nginx during the lame-duck wait: {e:?} (a 503 from the \
                     draining node must be retried on the other)\n{}",
                nginx.error_log()
            )
        });
        c.expect_type("system").await;
        members.push(c);
    }
    assert!(
        signalled.elapsed() < Duration::from_millis(3500),
        "the upgrades were made inside the lame-duck wait ({:?})",
        signalled.elapsed()
    );
    assert_eq!(
        metric(&staying, "roomcast_connections", &[]).await,
        12.0,
        "every new connection went to the node that stays"
    );
    let status = draining
        .wait_for_exit(Duration::from_secs(15))
        .await
        .expect("the draining node exits");
    assert!(status.success(), "{status:?}");
    assert!(
        signalled.elapsed() >= Duration::from_secs(4),
        "its members were kept for LAME_DUCK_MS: exited {:?} after SIGTERM",
        signalled.elapsed()
    );
}
