//! Contract: heartbeat. The relay pings every HEARTBEAT_MS; a connection silent since the previous
//! ping is terminated (TCP dropped, counted as 1006) and counted in
//! roomcast_heartbeat_terminations_total. Clients that answer pings stay connected.

mod common;

use std::time::{Duration, Instant};

use common::*;

const HEARTBEAT: Duration = Duration::from_millis(300);

/// How a raw client that never answers pings ended.
#[derive(Debug)]
struct SilentOutcome {
    pings: usize,
    close_frame: Option<Option<u16>>,
    ended_after: Option<Duration>,
}

/// Read everything the relay sends, never answering; stop when the connection ends or `limit` passes.
async fn read_without_answering(raw: &mut RawClient, limit: Duration) -> SilentOutcome {
    let started = Instant::now();
    let mut outcome = SilentOutcome {
        pings: 0,
        close_frame: None,
        ended_after: None,
    };
    loop {
        let left = limit.saturating_sub(started.elapsed());
        match raw.read_frame(left).await {
            Ok(f) if f.opcode == OP_PING => outcome.pings += 1,
            Ok(f) if f.opcode == OP_CLOSE => outcome.close_frame = Some(f.close_code()),
            Ok(_) => {}
            Err(RawEnd::Timeout) => return outcome,
            Err(RawEnd::Eof) | Err(RawEnd::Error(_)) => {
                outcome.ended_after = Some(started.elapsed());
                return outcome;
            }
        }
    }
}

#[tokio::test]
async fn silent_connection_is_terminated_and_counted_while_a_ponging_client_stays() {
    let relay = Relay::start(&[("HEARTBEAT_MS", "300")]);
    let mut ponging = Client::join_and_settle(&relay, "ponging", "hb").await;
    let mut silent = RawClient::connect(&relay, "silent", "hb").await;

    let (outcome, _events) = tokio::join!(
        read_without_answering(&mut silent, HEARTBEAT * 12),
        ponging.stay_connected_for(HEARTBEAT * 8)
    );
    let ended_after = outcome.ended_after.unwrap_or_else(|| {
        panic!(
            "a client that never answers pings must be disconnected within {:?}: {outcome:?}",
            HEARTBEAT * 12
        )
    });
    assert!(
        outcome.pings >= 1,
        "the relay must ping before terminating: {outcome:?}"
    );
    assert!(
        ended_after >= HEARTBEAT,
        "terminated before a whole interval passed: {outcome:?}"
    );

    // The tungstenite client answered every ping and is still fully usable.
    assert!(
        ponging.pings_seen >= 3,
        "expected several pings over {:?}, saw {}",
        HEARTBEAT * 8,
        ponging.pings_seen
    );
    ponging.stay_connected_for(HEARTBEAT * 3).await;
    ponging.publish_and_wait("still connected").await;

    wait_for_metric(
        &relay,
        "roomcast_heartbeat_terminations_total",
        &[],
        Duration::from_secs(5),
        |v| v >= 1.0,
    )
    .await;
    assert_eq!(
        metric(&relay, "roomcast_heartbeat_terminations_total", &[]).await,
        1.0,
        "only the silent connection is terminated"
    );
    wait_for_metric(
        &relay,
        "roomcast_connections_closed_total",
        &[("code", "1006")],
        Duration::from_secs(5),
        |v| v >= 1.0,
    )
    .await;
    wait_for_clients(&relay, 1, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn raw_client_answering_pings_with_pongs_stays_connected() {
    let relay = Relay::start(&[("HEARTBEAT_MS", "300")]);
    let mut raw = RawClient::connect(&relay, "answers", "hb").await;
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < HEARTBEAT * 8 {
        let left = (HEARTBEAT * 8).saturating_sub(started.elapsed());
        match raw.read_frame(left).await {
            Ok(f) if f.opcode == OP_PING => {
                pings += 1;
                raw.send_frame(true, OP_PONG, &f.payload).await;
            }
            Ok(f) if f.opcode == OP_CLOSE => panic!(
                "relay closed a client that answers pings: {:?}",
                f.close_code()
            ),
            Ok(_) => {}
            Err(RawEnd::Timeout) => break,
            Err(end) => panic!(
                "relay dropped a client that answers pings after {:?}: {end:?}",
                started.elapsed()
            ),
        }
    }
    assert!(
        pings >= 3,
        "expected several pings over {:?}, saw {pings}",
        HEARTBEAT * 8
    );
    raw.send_text(r#"{"type":"message","text":"alive"}"#).await;
    let m = raw.next_json_of_type("message", EVENT_TIMEOUT).await;
    assert_eq!(m["message"]["text"], "alive");
    assert_eq!(
        metric(&relay, "roomcast_heartbeat_terminations_total", &[]).await,
        0.0
    );
}

#[tokio::test]
async fn idle_client_that_answers_pings_is_kept_well_past_several_intervals() {
    let relay = Relay::start(&[("HEARTBEAT_MS", "300")]);
    let mut alice = Client::join_and_settle(&relay, "alice", "idle").await;
    let mut bob = Client::join_and_settle(&relay, "bob", "idle").await;
    let (a, b) = tokio::join!(
        alice.stay_connected_for(HEARTBEAT * 10),
        bob.stay_connected_for(HEARTBEAT * 10)
    );
    drop((a, b));
    bob.publish("after idling").await;
    assert_eq!(
        alice.next_message(EVENT_TIMEOUT).await["text"],
        "after idling"
    );
    assert_eq!(
        metric(&relay, "roomcast_heartbeat_terminations_total", &[]).await,
        0.0
    );
}

#[tokio::test]
async fn any_frame_from_the_peer_counts_as_a_sign_of_life() {
    let relay = Relay::start(&[("HEARTBEAT_MS", "300"), ("RATE_LIMIT", "1000")]);
    let mut raw = RawClient::connect(&relay, "chatty", "hb").await;
    let started = Instant::now();
    let mut pings = 0;
    let mut sent = 0;
    // Never answer pings, but send a message every 100 ms.
    while started.elapsed() < HEARTBEAT * 8 {
        raw.send_text(&format!(r#"{{"type":"message","text":"tick {sent}"}}"#))
            .await;
        sent += 1;
        let until = Instant::now() + Duration::from_millis(100);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match raw.read_frame(left).await {
                Ok(f) if f.opcode == OP_PING => pings += 1,
                Ok(f) if f.opcode == OP_CLOSE => {
                    panic!("closed a chatty client: {:?}", f.close_code())
                }
                Ok(_) => {}
                Err(RawEnd::Timeout) => break,
                Err(end) => panic!(
                    "relay dropped a client that keeps sending after {:?}: {end:?}",
                    started.elapsed()
                ),
            }
        }
    }
    assert!(pings >= 3, "expected several pings, saw {pings}");
    assert_eq!(
        metric(&relay, "roomcast_heartbeat_terminations_total", &[]).await,
        0.0
    );
}
