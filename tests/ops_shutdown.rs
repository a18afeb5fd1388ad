//! A drain a load balancer can follow: on SIGTERM `/readyz` answers 503 at once and upgrades are
//! refused, the open WebSockets stay (and work) for LAME_DUCK_MS, and only then get 1001, spread
//! over SHUTDOWN_SPREAD_MS. SIGINT, or a second signal, skips the wait; with nothing open there
//! is nothing to wait for.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A task that waits for one client's close: its code and when it came.
type CloseWaiter = tokio::task::JoinHandle<(Option<u16>, Instant)>;

/// Wait for each client's close in its own task; returns the waiters and the count of closes
/// seen so far.
fn await_closes(clients: Vec<Client>, timeout: Duration) -> (Vec<CloseWaiter>, Arc<AtomicUsize>) {
    let closed = Arc::new(AtomicUsize::new(0));
    let tasks = clients
        .into_iter()
        .map(|mut c| {
            let closed = closed.clone();
            tokio::spawn(async move {
                let code = c.expect_close(timeout).await;
                closed.fetch_add(1, Ordering::SeqCst);
                (code, Instant::now())
            })
        })
        .collect();
    (tasks, closed)
}

/// Poll `/readyz` until it answers 503; panics after `within`.
async fn wait_for_not_ready(relay: &Relay, within: Duration) -> Instant {
    let started = Instant::now();
    loop {
        let ready = http_get(relay, "/readyz", &[]).await;
        if ready.status == 503 {
            return Instant::now();
        }
        assert!(
            started.elapsed() < within,
            "/readyz still answers {} {:?} after the signal",
            ready.status,
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_readyz_503_at_once_keeps_connections_for_the_lame_duck_time_then_spreads_1001(
) {
    const LAME_DUCK: Duration = Duration::from_millis(1500);
    const SPREAD: Duration = Duration::from_millis(1000);
    let mut relay = Relay::start(&[
        ("LAME_DUCK_MS", "1500"),
        ("SHUTDOWN_SPREAD_MS", "1000"),
        ("SHUTDOWN_DRAIN_MS", "4000"),
    ]);
    let (mut ada, _, _) = Client::join(&relay, "ada", "duck").await;
    let (mut bob, _, _) = Client::join(&relay, "bob", "duck").await;
    let mut others = Vec::new();
    for i in 0..10 {
        others.push(Client::join(&relay, &format!("c{i}"), "duck").await.0);
    }
    wait_for_clients(&relay, 12, WAIT).await;
    let (tasks, closed) = await_closes(others, Duration::from_secs(15));

    let signalled = Instant::now();
    relay.signal(libc::SIGTERM);
    let not_ready = wait_for_not_ready(&relay, Duration::from_secs(1)).await;
    assert_eq!(
        closed.load(Ordering::SeqCst),
        0,
        "/readyz turned 503 {:?} after SIGTERM, before any connection was closed",
        not_ready - signalled
    );

    // During the lame-duck wait: new upgrades are refused, open connections still work.
    let path = format!("/chat?{}", relay.chat_query("late", "duck"));
    let late = upgrade_request(&relay, &path, Some(&relay.origin())).await;
    assert_rejected(&late, 503, "an upgrade during the lame-duck wait");
    ada.publish("still here").await;
    bob.expect_message("still here").await;
    assert_eq!(closed.load(Ordering::SeqCst), 0, "nobody closed yet");

    let mut times = Vec::new();
    for task in tasks {
        let (code, at) = task.await.expect("close waiter");
        assert_eq!(code, Some(1001), "every connection gets 1001");
        times.push(at - signalled);
    }
    times.sort();
    eprintln!("closes after SIGTERM: {times:?}");
    let (first, last) = (times[0], times[times.len() - 1]);
    assert!(
        first >= LAME_DUCK,
        "no close before LAME_DUCK_MS ({LAME_DUCK:?}) after SIGTERM; the first came after {first:?}"
    );
    assert!(
        last - first >= SPREAD * 2 / 5,
        "closes spread over SHUTDOWN_SPREAD_MS ({SPREAD:?}): 10 closes from {first:?} to {last:?}"
    );
    assert_eq!(ada.expect_close(WAIT).await, Some(1001));
    assert_eq!(bob.expect_close(WAIT).await, Some(1001));
    let status = relay
        .wait_for_exit(Duration::from_secs(10))
        .await
        .expect("the relay exits after the drain");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn sigint_skips_the_lame_duck_wait() {
    let mut relay = Relay::start(&[("LAME_DUCK_MS", "30000")]);
    let (ada, _, _) = Client::join(&relay, "ada", "int").await;
    let (tasks, _) = await_closes(vec![ada], Duration::from_secs(15));
    let signalled = Instant::now();
    relay.signal(libc::SIGINT);
    let (code, at) = tasks
        .into_iter()
        .next()
        .expect("one")
        .await
        .expect("waiter");
    assert_eq!(code, Some(1001));
    assert!(
        at - signalled < Duration::from_secs(10),
        "SIGINT closes without the 30 s lame-duck wait; took {:?}",
        at - signalled
    );
    let status = relay.wait_for_exit(Duration::from_secs(10)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

#[tokio::test]
async fn a_second_sigterm_cuts_the_lame_duck_wait_short() {
    let mut relay = Relay::start(&[("LAME_DUCK_MS", "30000")]);
    let (ada, _, _) = Client::join(&relay, "ada", "twice").await;
    let (tasks, closed) = await_closes(vec![ada], Duration::from_secs(20));
    relay.signal(libc::SIGTERM);
    wait_for_not_ready(&relay, Duration::from_secs(1)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        closed.load(Ordering::SeqCst),
        0,
        "still in the lame-duck wait"
    );
    let second = Instant::now();
    relay.signal(libc::SIGTERM);
    let (code, at) = tasks
        .into_iter()
        .next()
        .expect("one")
        .await
        .expect("waiter");
    assert_eq!(code, Some(1001));
    assert!(
        at - second < Duration::from_secs(10),
        "a second SIGTERM closes without waiting out LAME_DUCK_MS=30000; took {:?}",
        at - second
    );
    let status = relay.wait_for_exit(Duration::from_secs(10)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

#[tokio::test]
async fn with_no_open_connection_sigterm_does_not_wait_for_the_lame_duck_time() {
    let mut relay = Relay::start(&[("LAME_DUCK_MS", "30000")]);
    let (status, took) = relay.stop_with_sigterm(Duration::from_secs(20)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(
        took < Duration::from_secs(10),
        "nothing open: no lame-duck wait; exit took {took:?}"
    );
}
