//! The server API (`/api/*`, docs/API.md) against the real binary: every route with good
//! input, bad input and a wrong key; publishes reach both dialects and are idempotent.

mod common;

use common::*;
use serde_json::{json, Value};

const KEY: &str = "api-test-key";

fn relay() -> Relay {
    Relay::start(&[("API_KEY", KEY)])
}

async fn call(
    relay: &Relay,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> HttpResponse {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        relay.addr,
        body.len()
    );
    if let Some(key) = key {
        req.push_str(&format!("Authorization: Bearer {key}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    http_exchange(relay.addr, &req)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

async fn ok(relay: &Relay, method: &str, path: &str, body: Value) -> Value {
    let r = call(relay, method, path, Some(KEY), &body.to_string()).await;
    assert_eq!(
        r.status, 200,
        "{method} {path} {body}: {}\n{}",
        r.head, r.body
    );
    r.json()
}

#[tokio::test]
async fn without_a_key_the_api_is_not_there() {
    let relay = Relay::start(&[]);
    let r = call(&relay, "POST", "/api/publish", Some("x"), "{}").await;
    assert_eq!(r.status, 404, "{}", r.head);
}

#[tokio::test]
async fn a_wrong_or_missing_key_is_401_on_every_route() {
    let relay = relay();
    for (method, path) in [
        ("POST", "/api/publish"),
        ("POST", "/api/disconnect"),
        ("GET", "/api/rooms"),
        ("GET", "/api/rooms/lobby/history"),
        ("GET", "/api/rooms/lobby/presence"),
    ] {
        for key in [None, Some("wrong"), Some("")] {
            let r = call(&relay, method, path, key, "{}").await;
            assert_eq!(r.status, 401, "{method} {path} with {key:?}: {}", r.head);
            assert_eq!(r.json()["error"], "unauthorized");
        }
    }
    assert_eq!(
        metric(
            &relay,
            "roomcast_api_requests_total",
            &[("route", "unauthorized")]
        )
        .await,
        15.0
    );
}

#[tokio::test]
async fn publish_reaches_both_dialects_and_is_idempotent_by_request_id() {
    let relay = relay();
    let (mut first, _, _) = Client::join(&relay, "ada", "lobby").await;
    let (mut second, _) = Client::authed(&relay, &relay.token).await;
    second.join_room("lobby").await;

    let body = json!({"room": "lobby", "text": " deploy 42 done ", "from": "ci", "requestId": "deploy-42"});
    let a = ok(&relay, "POST", "/api/publish", body.clone()).await;
    assert_eq!(a["duplicate"], false);
    assert_eq!(a["seq"], 1);
    let message = first.next_message(WAIT).await;
    assert_eq!(message["text"], "deploy 42 done");
    assert_eq!(message["from"], "ci");
    assert_eq!(message["id"], a["id"]);
    let chat = second.expect_type("chat").await;
    assert_eq!(
        (chat["userId"].as_str(), chat["requestId"].as_str()),
        (Some("ci"), Some("deploy-42"))
    );

    let again = ok(&relay, "POST", "/api/publish", body).await;
    assert_eq!(
        (
            again["id"].clone(),
            again["seq"].clone(),
            again["duplicate"].clone()
        ),
        (a["id"].clone(), a["seq"].clone(), json!(true))
    );
    let conflict = call(
        &relay,
        "POST",
        "/api/publish",
        Some(KEY),
        &json!({"room": "lobby", "text": "other", "requestId": "deploy-42"}).to_string(),
    )
    .await;
    assert_eq!(conflict.status, 409, "{}", conflict.body);
    // Without from: "api". Into a room nobody is in: kept in its history.
    let b = ok(
        &relay,
        "POST",
        "/api/publish",
        json!({"room": "room:empty", "text": "x"}),
    )
    .await;
    assert_eq!(b["seq"], 1);
}

#[tokio::test]
async fn bad_publish_bodies_get_400_and_oversize_bodies_413() {
    let relay = Relay::start(&[("API_KEY", KEY), ("API_MAX_BODY_BYTES", "4096")]);
    for body in [
        "not json".to_string(),
        "[1]".to_string(),
        json!({"text": "no room"}).to_string(),
        json!({"room": "lobby"}).to_string(),
        json!({"room": "bad room", "text": "x"}).to_string(),
        json!({"room": "lobby", "text": "   "}).to_string(),
        json!({"room": "lobby", "text": "é".repeat(1001)}).to_string(),
        json!({"room": "lobby", "text": "x", "from": "<script>"}).to_string(),
        json!({"room": "lobby", "text": "x", "requestId": ""}).to_string(),
        json!({"room": "lobby", "text": "x", "extra": 1}).to_string(),
    ] {
        let r = call(&relay, "POST", "/api/publish", Some(KEY), &body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert!(r.json()["error"].is_string(), "a JSON error: {}", r.body);
    }
    let big = json!({"room": "lobby", "text": "x".repeat(5000)}).to_string();
    let r = call(&relay, "POST", "/api/publish", Some(KEY), &big).await;
    assert_eq!(r.status, 413, "{}", r.body);
    let r = call(&relay, "GET", "/api/publish", Some(KEY), "").await;
    assert_eq!(r.status, 405, "{}", r.body);
    let r = call(&relay, "GET", "/api/nope", Some(KEY), "").await;
    assert_eq!(r.status, 404, "{}", r.body);
}

#[tokio::test]
async fn history_gives_the_messages_after_since_with_epoch_and_complete() {
    let relay = Relay::start(&[("API_KEY", KEY), ("HISTORY_LIMIT", "3")]);
    for i in 1..=5 {
        ok(
            &relay,
            "POST",
            "/api/publish",
            json!({"room": "ops", "text": format!("m{i}")}),
        )
        .await;
    }
    let h = ok(&relay, "GET", "/api/rooms/ops/history?since=3", json!({})).await;
    assert_eq!(h["complete"], true);
    let seqs: Vec<u64> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [4, 5]);
    assert!(h["epoch"].as_str().is_some_and(|e| !e.is_empty()));
    // Only the last 3 are held: from 0, what is held, and not complete.
    let all = ok(&relay, "GET", "/api/rooms/ops/history", json!({})).await;
    assert_eq!(all["complete"], false);
    assert_eq!(all["messages"].as_array().unwrap().len(), 3);
    let r = call(
        &relay,
        "GET",
        "/api/rooms/ops/history?since=x",
        Some(KEY),
        "",
    )
    .await;
    assert_eq!(r.status, 400);
    let r = call(
        &relay,
        "GET",
        "/api/rooms/bad%20room/history",
        Some(KEY),
        "",
    )
    .await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn presence_lists_who_is_in_a_room() {
    let relay = relay();
    let _a = Client::join_and_settle(&relay, "ada", "team").await;
    let _b = Client::join_and_settle(&relay, "bob", "team").await;
    let (mut c, _) = Client::authed(&relay, &relay.token).await;
    c.join_room("team").await;
    let p = ok(&relay, "GET", "/api/rooms/team/presence", json!({})).await;
    assert_eq!(p["online"], 3);
    let mut names: Vec<&str> = p["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["ada", "bob", "guest"]);
    let empty = ok(&relay, "GET", "/api/rooms/nobody/presence", json!({})).await;
    assert_eq!(empty["online"], 0);
}

#[tokio::test]
async fn disconnect_closes_that_users_connections_with_4000() {
    let relay = relay();
    let mut ada1 = Client::join_and_settle(&relay, "ada", "r1").await;
    let mut ada2 = Client::join_and_settle(&relay, "ada", "r2").await;
    let mut bob = Client::join_and_settle(&relay, "bob", "r1").await;
    let d = ok(
        &relay,
        "POST",
        "/api/disconnect",
        json!({"name": "ada", "room": "r2"}),
    )
    .await;
    assert_eq!(d["disconnected"], 1);
    assert_eq!(ada2.expect_close(WAIT).await, Some(4000));
    assert_eq!(
        ada2.close_reason.as_deref(),
        Some("disconnected by the server")
    );
    let d = ok(&relay, "POST", "/api/disconnect", json!({"name": "ada"})).await;
    assert_eq!(d["disconnected"], 1);
    assert_eq!(ada1.expect_close(WAIT).await, Some(4000));
    bob.publish_and_wait("still here").await;
    for body in [
        json!({}),
        json!({"name": ""}),
        json!({"name": "ada", "room": "a b"}),
    ] {
        let r = call(
            &relay,
            "POST",
            "/api/disconnect",
            Some(KEY),
            &body.to_string(),
        )
        .await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
    }
}

#[tokio::test]
async fn rooms_are_listed_with_their_online_counts_in_pages() {
    let relay = relay();
    let mut clients = Vec::new();
    for room in ["a", "b", "c"] {
        clients.push(Client::join_and_settle(&relay, "n", room).await);
    }
    clients.push(Client::join_and_settle(&relay, "m", "b").await);
    let page = ok(&relay, "GET", "/api/rooms?limit=2", json!({})).await;
    assert_eq!(
        page["rooms"],
        json!([{"room": "a", "online": 1}, {"room": "b", "online": 2}])
    );
    assert_eq!(page["next"], "b");
    let rest = ok(&relay, "GET", "/api/rooms?limit=2&after=b", json!({})).await;
    assert_eq!(rest["rooms"], json!([{"room": "c", "online": 1}]));
    assert_eq!(rest["next"], Value::Null);
    let r = call(&relay, "GET", "/api/rooms?limit=0", Some(KEY), "").await;
    assert_eq!(r.status, 400);
}
