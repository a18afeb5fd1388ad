//! What docs/PROTOCOL.md says about message sizes and `bad_type`, checked against the real
//! relay: 500 four-byte characters plus a short `requestId` fit in MAX_PAYLOAD_BYTES (2048), a
//! longer `requestId` does not (1009), and a bad `requestId` is `bad_type` with a message that
//! names it.

mod common;

use common::*;
use serde_json::json;

/// `{"type":"message","text":"<500 emoji>","requestId":"<id>"}` as the bundled client writes it.
fn emoji_message(request_id: &str) -> String {
    json!({"type": "message", "text": "😀".repeat(500), "requestId": request_id}).to_string()
}

#[tokio::test]
async fn five_hundred_emoji_with_a_short_request_id_fit_and_a_longer_one_is_closed_1009() {
    let relay = Relay::start(&[]);
    let fits = emoji_message("x");
    assert_eq!(fits.len(), 2044, "the arithmetic PROTOCOL.md shows");
    let mut raw = RawClient::connect(&relay, "ada", "sizes").await;
    raw.send_text(&fits).await;
    let ack = raw.next_json_of_type("ack", EVENT_TIMEOUT).await;
    assert_eq!(ack["requestId"], "x", "{ack}");

    let largest = emoji_message("abcde");
    assert_eq!(largest.len(), 2048);
    raw.send_text(&largest).await;
    raw.next_json_of_type("ack", EVENT_TIMEOUT).await;

    let too_big = emoji_message("abcdef");
    assert_eq!(too_big.len(), 2049);
    raw.send_text(&too_big).await;
    assert_eq!(raw.expect_close(EVENT_TIMEOUT).await, Some(1009));
}

#[tokio::test]
async fn a_bad_request_id_is_bad_type_and_the_message_names_the_request_id() {
    let relay = Relay::start(&[]);
    let (mut ada, _, _) = Client::join(&relay, "ada", "ids").await;
    for bad in [json!(7), json!(""), json!(null), json!("r".repeat(65))] {
        ada.send_json(&json!({"type": "message", "text": "hi", "requestId": bad}))
            .await;
        let e = ada.next_error(EVENT_TIMEOUT).await;
        assert_eq!(e["code"], "bad_type", "requestId {bad}: {e}");
        assert!(
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("requestId")),
            "the message says the requestId is what is wrong ({bad}): {e}"
        );
    }
    // Other bad_type causes keep the general message.
    ada.send_json(&json!({"type": "chat", "text": "hi"})).await;
    let e = ada.next_error(EVENT_TIMEOUT).await;
    assert_eq!(e["code"], "bad_type");
    assert!(
        !e["message"].as_str().unwrap_or("").contains("requestId"),
        "{e}"
    );
}
