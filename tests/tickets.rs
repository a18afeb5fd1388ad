//! Signed tickets (JWT_SECRET, JWT_PUBLIC_KEY_FILE) against the real binary: wherever a token
//! goes, in both dialects. `sub` replaces the name, `rooms` gates joins, `pub:false` is
//! read-only; bad signatures, expired tickets and other algorithms are refused; the static token
//! only counts when CHAT_TOKEN is set explicitly; tickets never reach the logs.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use jsonwebtoken::{encode, get_current_timestamp, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const SECRET: &str = "ticket-test-secret";

fn mint(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode")
}

fn claims(sub: &str, rooms: &[&str], publish: bool) -> Value {
    json!({"sub": sub, "rooms": rooms, "pub": publish, "exp": get_current_timestamp() + 300})
}

fn query(ticket: &str, name: &str, room: &str) -> String {
    format!("token={ticket}&name={name}&room={room}")
}

/// Tickets on, CHAT_TOKEN not set: only tickets get in.
fn ticket_relay() -> Relay {
    Relay::builder()
        .without_token()
        .env("JWT_SECRET", SECRET)
        .env("RUST_LOG", "debug")
        .start()
}

#[tokio::test]
async fn a_ticket_names_its_holder_and_gates_the_room_in_the_first_dialect() {
    let relay = ticket_relay();
    let ticket = mint(claims("ada", &["lobby", "team:*"], true));
    let mut c = Client::connect_query(&relay, &query(&ticket, "mallory", "lobby"))
        .await
        .expect("a valid ticket for its room");
    let system = c.expect_type("system").await;
    assert_eq!(
        system["message"], "connected as ada",
        "sub, not the name asked for"
    );
    c.expect_type("history").await;
    c.publish_and_wait("hello").await;

    let other = Client::connect_query(&relay, &query(&ticket, "ada", "elsewhere")).await;
    assert!(matches!(other, Err(ConnectError::Status(403))), "{other:?}");
    let resp = upgrade_request(
        &relay,
        &format!("/chat?{}", query(&ticket, "ada", "elsewhere")),
        Some(&relay.origin()),
    )
    .await;
    assert_rejected(&resp, 403, "a ticket for other rooms");
    assert!(resp.body.contains("ticket"), "{}", resp.body);
    assert!(
        metric(
            &relay,
            "roomcast_upgrade_rejections_total",
            &[("reason", "forbidden_room")]
        )
        .await
            >= 2.0
    );
    // Prefixes: "team:*" covers team:ops. (First-dialect room names have no ':', so the
    // prefix is checked with the second dialect below.)
    let logs = relay.logs();
    assert!(!logs.contains(&ticket), "a ticket reached the logs");
}

#[tokio::test]
async fn bad_expired_and_other_algorithm_tickets_and_the_unset_static_token_get_401() {
    let relay = ticket_relay();
    let now = get_current_timestamp();
    let wrong_key = encode(
        &Header::new(Algorithm::HS256),
        &claims("ada", &["lobby"], true),
        &EncodingKey::from_secret(b"not the secret"),
    )
    .unwrap();
    let hs384 = encode(
        &Header::new(Algorithm::HS384),
        &claims("ada", &["lobby"], true),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let expired = mint(json!({"sub": "ada", "rooms": ["lobby"], "exp": now - 120}));
    let no_exp = mint(json!({"sub": "ada", "rooms": ["lobby"]}));
    let unsigned =
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZGEiLCJyb29tcyI6WyJsb2JieSJdLCJleHAiOjk5OTk5OTk5OTl9.";
    for (what, token) in [
        ("wrong key", wrong_key.as_str()),
        ("HS384", hs384.as_str()),
        ("expired", expired.as_str()),
        ("no exp", no_exp.as_str()),
        ("alg none", unsigned),
        ("dev-token", "dev-token"),
        ("the tests' token", TOKEN),
    ] {
        let r = Client::connect_query(&relay, &query(token, "ada", "lobby")).await;
        assert!(matches!(r, Err(ConnectError::Status(401))), "{what}: {r:?}");
    }
}

#[tokio::test]
async fn an_explicit_static_token_still_works_beside_tickets() {
    let relay = Relay::builder().env("JWT_SECRET", SECRET).start();
    let (_c, system, _) = Client::join(&relay, "bob", "lobby").await;
    assert_eq!(system["message"], "connected as bob");
    let ticket = mint(claims("ada", &["lobby"], true));
    Client::connect_query(&relay, &query(&ticket, "x", "lobby"))
        .await
        .expect("and tickets too");
}

#[tokio::test]
async fn a_read_only_ticket_gets_forbidden_and_publishes_nothing() {
    let relay = ticket_relay();
    let viewer = mint(claims("viewer", &["ops"], false));
    let writer = mint(claims("writer", &["ops"], true));
    let mut v = Client::connect_query(&relay, &query(&viewer, "v", "ops"))
        .await
        .unwrap();
    let mut w = Client::connect_query(&relay, &query(&writer, "w", "ops"))
        .await
        .unwrap();
    for c in [&mut v, &mut w] {
        c.expect_type("system").await;
        c.expect_type("history").await;
    }
    v.publish("let me in").await;
    v.next_error(WAIT).await; // asserts the next data event is an error
    w.publish_and_wait("from the writer").await;
    let got = v.next_message(WAIT).await;
    assert_eq!(
        got["text"], "from the writer",
        "the viewer reads; nothing of its own went out"
    );
    assert_eq!(
        metric(
            &relay,
            "roomcast_invalid_messages_total",
            &[("code", "forbidden")]
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn tickets_in_the_second_dialect() {
    let relay = ticket_relay();
    let ticket = mint(claims("ada", &["team:*"], true));
    let (mut c, ok) = Client::authed(&relay, &ticket).await;
    assert_eq!(ok["userId"], "ada");
    c.join_room("team:ops").await;
    c.chat("team:ops", "hi", "r1").await;
    assert_eq!(c.expect_type("chat").await["userId"], "ada");
    c.send_json(&json!({"type": "join", "roomId": "lobby"}))
        .await;
    assert_eq!(
        c.expect_close_with().await,
        (1008, "room not allowed".into())
    );

    let viewer = mint(claims("viewer", &["team:*"], false));
    let (mut v, _) = Client::authed(&relay, &viewer).await;
    v.join_room("team:ops").await;
    v.chat("team:ops", "hi", "r2").await;
    assert_eq!(v.expect_close_with().await, (1008, "forbidden".into()));

    let expired =
        mint(json!({"sub": "ada", "rooms": ["team:*"], "exp": get_current_timestamp() - 120}));
    for token in [expired.as_str(), "dev-token", TOKEN] {
        let mut e = Client::connect_root(&relay, None).await.unwrap();
        e.send_json(&json!({"type": "auth", "token": token})).await;
        assert_eq!(
            e.expect_close_with().await,
            (4403, "auth failed".into()),
            "{token}"
        );
    }
    assert!(!relay.logs().contains(&ticket), "a ticket reached the logs");
}

fn openssl(args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl {args:?}");
}

fn keypair(dir: &Path, kind: &str) -> (Vec<u8>, std::path::PathBuf) {
    let private = dir.join(format!("{kind}.key"));
    let public = dir.join(format!("{kind}.pub"));
    let p = private.to_str().unwrap();
    match kind {
        "rsa" => openssl(&[
            "genpkey",
            "-quiet",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            p,
        ]),
        _ => openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            p,
        ]),
    }
    openssl(&[
        "pkey",
        "-in",
        p,
        "-pubout",
        "-out",
        public.to_str().unwrap(),
    ]);
    (std::fs::read(&private).unwrap(), public)
}

#[tokio::test]
async fn rs256_and_es256_tickets_verify_against_a_public_key_file() {
    let dir = TempDir::new("tickets");
    for (kind, alg) in [("rsa", Algorithm::RS256), ("ec", Algorithm::ES256)] {
        let (private, public) = keypair(dir.path(), kind);
        let relay = Relay::builder()
            .without_token()
            .env("JWT_PUBLIC_KEY_FILE", public.display())
            .start();
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&private).unwrap(),
            _ => EncodingKey::from_ec_pem(&private).unwrap(),
        };
        let ticket = encode(&Header::new(alg), &claims("ada", &["lobby"], true), &key).unwrap();
        let (mut c, ok) = Client::authed(&relay, &ticket).await;
        assert_eq!(ok["userId"], "ada", "{kind}");
        c.join_room("lobby").await;
        // An HS256 ticket signed with the public key's bytes (the classic confusion attack).
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &claims("ada", &["lobby"], true),
            &EncodingKey::from_secret(&std::fs::read(&public).unwrap()),
        )
        .unwrap();
        let r = Client::connect_query(&relay, &query(&confused, "ada", "lobby")).await;
        assert!(matches!(r, Err(ConnectError::Status(401))), "{kind}: {r:?}");
    }
}

#[test]
fn a_public_key_file_that_is_not_a_key_stops_the_start() {
    let dir = TempDir::new("tickets-bad");
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a key").unwrap();
    let out = Command::new(relay_binary())
        .env_clear()
        .env("PORT", "0")
        .env("HOST", "127.0.0.1")
        .env("JWT_PUBLIC_KEY_FILE", &bad)
        .output()
        .expect("run the relay");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("JWT_PUBLIC_KEY_FILE") && stderr.contains("public key"),
        "{stderr}"
    );
}

/// A ticket's user keeps one de-duplication session across reconnects and dialects: a retried
/// `requestId` is caught on a new connection. A static-token client cannot claim that session.
#[tokio::test]
async fn a_ticket_users_retry_is_deduplicated_across_connections() {
    let relay = Relay::builder().env("JWT_SECRET", SECRET).start();
    let ticket = mint(claims("ada", &["lobby"], true));
    let mut first = Client::connect_query(&relay, &query(&ticket, "x", "lobby"))
        .await
        .unwrap();
    let system = first.expect_type("system").await;
    let session = system["session"].as_str().unwrap().to_string();
    first.expect_type("history").await;
    first
        .send_json(&json!({"type": "message", "text": "once", "requestId": "r1"}))
        .await;
    let ack = first.next_event_of_type("ack", WAIT).await;
    assert_ne!(ack["duplicate"], true, "{ack}");
    drop(first);
    let mut again = Client::connect_query(&relay, &query(&ticket, "x", "lobby"))
        .await
        .unwrap();
    again.expect_type("system").await;
    again.expect_type("history").await;
    again
        .send_json(&json!({"type": "message", "text": "once", "requestId": "r1"}))
        .await;
    let ack2 = again.next_event_of_type("ack", WAIT).await;
    assert_eq!(
        (ack2["duplicate"].clone(), ack2["seq"].clone()),
        (json!(true), ack["seq"].clone())
    );
    // A static-token client giving back the ticket user's session gets a fresh one.
    let (mut other, system, _) = Client::join(&relay, "eve", "lobby").await;
    assert_ne!(system["session"].as_str().unwrap(), session);
    let _ = other.close_normally().await;
    let q = format!("{}&session={session}", relay.chat_query("eve", "lobby"));
    let mut eve = Client::connect_query(&relay, &q).await.unwrap();
    let system = eve.expect_type("system").await;
    assert_ne!(
        system["session"].as_str().unwrap(),
        session,
        "a ticket session cannot be claimed"
    );
}
