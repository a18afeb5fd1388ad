//! The broker seam: every publish goes through a [`Broker`], even on one node.
//!
//! A broker decides a message's identity and order (id, per-room `seq`), keeps history for
//! resume and de-duplication, and gets the encoded frame to every local member. The in-memory
//! broker does the first two under the room's lock and queues the frame there; the hub delivers
//! it after the lock is released, in `seq` order ([`Hub::settle`]). A Redis broker (several nodes)
//! would assign `seq` and keep history in Redis and queue the frame for local delivery when its
//! subscription receives the message; connection code would not change, because it only ever
//! calls [`Broker::publish`].
//!
//! De-duplication is keyed on (room, session, requestId). The session is issued by the relay
//! (`http.rs`), never taken from what a client says about itself: a display name is a label that
//! anyone may pick, so two clients both called `guest` must never swallow each other's messages.

use std::net::IpAddr;
use std::sync::Arc;

use crate::audit::{Audit, AuditEvent, Dialect};
use crate::hub::{HistoryEntry, Hub, Room, RoomSnapshot, Sender};
use crate::outbox::Outbox;
use crate::protocol::{self, ClientMessage, ErrorCode};

/// What a publish did, for the sender's ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub id: uuid::Uuid,
    pub seq: u64,
    /// True when the same session already published this `requestId` with the same text in
    /// this room, within the history window: nothing was broadcast again.
    pub duplicate: bool,
}

/// Why a publish was refused. Nothing was broadcast and no `seq` was used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The same session already published this `requestId` with a different text.
    #[error("requestId already used by this session for a different text")]
    Conflict,
    /// The room's delivery queue is full (`hub::DELIVERY_QUEUE_MAX`): the room cannot take
    /// messages faster than it delivers them.
    #[error("the room's delivery queue is full")]
    Busy,
    /// The broker could not take the message (Redis down, too slow, or its queue full).
    #[error("the broker is unavailable")]
    Unavailable,
}

impl PublishError {
    /// The error event a client is told.
    pub fn code(self) -> ErrorCode {
        match self {
            PublishError::Conflict => ErrorCode::Conflict,
            // The room delivers slower than it is published to: same answer as a rate limit.
            PublishError::Busy => ErrorCode::RateLimited,
            PublishError::Unavailable => ErrorCode::Unavailable,
        }
    }
}

/// One publish: where, from whom, what.
pub struct Publish<'a> {
    pub room: &'a Arc<Room>,
    pub from: &'a Sender,
    pub message: &'a ClientMessage<'a>,
    /// The client's address (none for the server API), for the audit log.
    pub address: Option<IpAddr>,
}

/// Who is told how a publish went, when a networked broker learns it later.
pub enum Reply {
    /// A first-dialect connection: an ack (when the message has a requestId) or an error event,
    /// queued behind the room's frames so it never overtakes the message it answers.
    Ack(Arc<Outbox>),
    /// A second-dialect connection: it sees its own chat event like every member, so only a
    /// refusal is answered (an error event).
    Chat(Arc<Outbox>),
    /// The server API: the outcome, once.
    Api(tokio::sync::oneshot::Sender<Result<Published, PublishError>>),
}

impl Reply {
    /// Which dialect published (for the audit log).
    pub fn dialect(&self) -> Dialect {
        match self {
            Reply::Ack(_) => Dialect::Query,
            Reply::Chat(_) => Dialect::Auth,
            Reply::Api(_) => Dialect::Api,
        }
    }

    /// Tell the publisher. Refusals sent to a connection are counted here
    /// (`roomcast_publish_unavailable_total`, or the error code's invalid-message count); the
    /// server API counts its own.
    pub fn answer(
        self,
        hub: &Arc<Hub>,
        room: &Arc<Room>,
        request_id: Option<&str>,
        outcome: Result<Published, PublishError>,
    ) {
        let outbox = match (self, &outcome) {
            (Reply::Api(tx), _) => {
                let _ = tx.send(outcome);
                return;
            }
            (Reply::Chat(_), Ok(_)) => return,
            (Reply::Ack(outbox), Ok(p)) => {
                if let Some(rid) = request_id {
                    let ack = protocol::ack_event(rid, &p.id, p.seq, p.duplicate);
                    hub.send_in_order(room, &outbox, ack);
                }
                return;
            }
            (Reply::Ack(outbox) | Reply::Chat(outbox), Err(_)) => outbox,
        };
        let Err(error) = outcome else { return };
        let code = error.code();
        match code {
            ErrorCode::Unavailable => hub.metrics().publish_unavailable.increment(1),
            ErrorCode::RateLimited => hub.metrics().rate_limited.increment(1),
            other => hub.metrics().invalid_message(other.as_str()),
        }
        hub.send_in_order(room, &outbox, protocol::error_event(code));
    }
}

pub trait Broker: Send + Sync + 'static {
    /// Publish. Must not block or await. `Ok(Some(_))`: done, the caller answers;
    /// `Ok(None)`: accepted by a networked broker, which answers `reply` itself once the
    /// message is published or not; `Err`: refused at once, nothing published, the caller
    /// answers.
    fn publish(
        &self,
        publish: &Publish<'_>,
        reply: Reply,
    ) -> Result<Option<Published>, PublishError>;

    /// A room's members across every node, when a networked broker knows it (`None`: this
    /// node's count is the whole count).
    fn online(
        &self,
        _room: &str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<u64>> + Send + '_>> {
        Box::pin(std::future::ready(None))
    }

    /// A room's snapshot (epoch, last seq, history) from a networked broker, which holds the
    /// truth; `None`: read the hub (the in-memory broker), or the broker did not answer
    /// (`Some(None)` is not used; see the server API's history route).
    fn room_snapshot(
        &self,
        _room: &str,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<Option<RoomSnapshot>, PublishError>>
                + Send
                + '_,
        >,
    > {
        Box::pin(std::future::ready(Ok(None)))
    }

    /// Ask every other node to close `name`'s connections (this node closes its own).
    fn disconnect(&self, _name: &str, _room: Option<&str>) {}

    /// Whether publishes can succeed now (`/readyz`).
    fn is_ready(&self) -> bool {
        true
    }
}

/// Write a publish to the audit log before it can be delivered: a full audit queue refuses the
/// publish (`unavailable`), so nothing is delivered that was not audited.
pub fn audit_publish(
    audit: Option<&Audit>,
    publish: &Publish<'_>,
    id: &uuid::Uuid,
    seq: Option<u64>,
    sent_at: &str,
    dialect: Dialect,
) -> Result<(), PublishError> {
    let Some(audit) = audit else { return Ok(()) };
    audit
        .record(&AuditEvent::Publish {
            id,
            room: publish.room.name(),
            seq,
            from: &publish.from.name,
            text: &publish.message.text,
            request_id: publish.message.request_id.as_deref(),
            sent_at,
            address: publish.address,
            dialect,
        })
        .map_err(|_| PublishError::Unavailable)
}

/// Single-node broker: ordering and history live in the room state in this process.
pub struct MemoryBroker {
    hub: Arc<Hub>,
    audit: Option<Audit>,
}

impl Broker for MemoryBroker {
    fn publish(
        &self,
        publish: &Publish<'_>,
        reply: Reply,
    ) -> Result<Option<Published>, PublishError> {
        self.publish_audited(publish, Some(reply.dialect()))
            .map(Some)
    }
}

impl MemoryBroker {
    pub fn new(hub: Arc<Hub>) -> MemoryBroker {
        MemoryBroker { hub, audit: None }
    }

    /// Write every publish to `audit` before it is delivered.
    pub fn with_audit(mut self, audit: Option<Audit>) -> MemoryBroker {
        self.audit = audit;
        self
    }

    /// Publish and say what happened, at once: everything lives in this process.
    pub fn publish_now(
        &self,
        room: &Arc<Room>,
        from: &Sender,
        message: &ClientMessage<'_>,
    ) -> Result<Published, PublishError> {
        let publish = Publish {
            room,
            from,
            message,
            address: None,
        };
        self.publish_audited(&publish, None)
    }

    /// [`MemoryBroker::publish_now`], audited (when the audit log is on) under the room lock,
    /// with the `seq` the message is about to take, before it is queued for delivery.
    fn publish_audited(
        &self,
        publish: &Publish<'_>,
        dialect: Option<Dialect>,
    ) -> Result<Published, PublishError> {
        let Publish {
            room,
            from,
            message,
            ..
        } = *publish;
        let mut st = room.lock();
        if let Some(rid) = message.request_id.as_deref() {
            if let Some(e) = st.find_request(from.session, rid) {
                // Same session, same requestId: a retry when the text is the same, a client bug
                // (or a reused id) when it is not — then nothing is published and it is told so.
                if !protocol::message_text_is(&e.json, &message.text) {
                    return Err(PublishError::Conflict);
                }
                return Ok(Published {
                    id: e.id,
                    seq: e.seq,
                    duplicate: true,
                });
            }
        }
        if st.delivery_full() {
            return Err(PublishError::Busy);
        }
        let id = uuid::Uuid::new_v4();
        let sent_at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        if let Some(dialect) = dialect {
            let seq = Some(st.next_seq());
            audit_publish(self.audit.as_ref(), publish, &id, seq, &sent_at, dialect)?;
        }
        let seq = st.take_seq();
        let event = protocol::message_event(&protocol::MessageFields {
            id: &id,
            room: room.name(),
            from: &from.name,
            text: &message.text,
            sent_at: &sent_at,
            request_id: message.request_id.as_deref(),
            seq,
        });
        let entry = HistoryEntry::new(
            seq,
            id,
            from.session,
            message.request_id.as_deref(),
            event.inner.clone(),
            event.frame.len(),
        );
        self.hub.remember(room, &mut st, entry);
        st.enqueue(event);
        drop(st);
        self.hub.settle(room);
        Ok(Published {
            id,
            seq,
            duplicate: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::tests::{events, message, sender, settings};
    use crate::hub::HubSettings;
    use crate::metrics::Metrics;
    use crate::outbox::Outbox;

    fn setup() -> (MemoryBroker, Arc<Room>, Arc<Outbox>, crate::hub::Membership) {
        let hub = Arc::new(Hub::new(
            HubSettings {
                history_limit: 10,
                ..settings(10)
            },
            Metrics::new(),
        ));
        let room = hub.room("r").unwrap();
        let watcher = Arc::new(Outbox::default());
        let m = hub.join(
            hub.reserve("r").unwrap(),
            &watcher,
            sender("watcher", 9),
            None,
            crate::hub::Greeting::Query,
        );
        events(&watcher);
        (MemoryBroker::new(hub), room, watcher, m)
    }

    fn broadcast_texts(watcher: &Outbox) -> Vec<String> {
        events(watcher)
            .into_iter()
            .filter(|e| e["type"] == "message")
            .map(|e| e["message"]["text"].as_str().unwrap().to_string())
            .collect()
    }

    #[tokio::test]
    async fn request_ids_are_per_session_never_per_name() {
        let (broker, room, watcher, _m) = setup();
        // Two different clients who both call themselves guest, both using requestId "1".
        let (one, two) = (sender("guest", 1), sender("guest", 2));
        let a = broker
            .publish_now(&room, &one, &message("from one", Some("1")))
            .unwrap();
        let b = broker
            .publish_now(&room, &two, &message("from two", Some("1")))
            .unwrap();
        assert!(!a.duplicate && !b.duplicate);
        assert_ne!((a.id, a.seq), (b.id, b.seq));
        assert_eq!(broadcast_texts(&watcher), ["from one", "from two"]);

        // The same session retrying (after a reconnect, under another name even) is a duplicate.
        let retry = Sender {
            name: "renamed".into(),
            session: 1,
        };
        let again = broker
            .publish_now(&room, &retry, &message("from one", Some("1")))
            .unwrap();
        assert_eq!((again.id, again.seq, again.duplicate), (a.id, a.seq, true));
        assert!(broadcast_texts(&watcher).is_empty(), "not broadcast again");
    }

    #[tokio::test]
    async fn same_request_id_with_other_text_is_a_conflict_and_not_broadcast() {
        let (broker, room, watcher, _m) = setup();
        let me = sender("ada", 7);
        let first = broker
            .publish_now(&room, &me, &message("hello", Some("r1")))
            .unwrap();
        assert_eq!(broadcast_texts(&watcher), ["hello"]);
        assert_eq!(
            broker.publish_now(&room, &me, &message("goodbye", Some("r1"))),
            Err(PublishError::Conflict)
        );
        assert!(broadcast_texts(&watcher).is_empty());
        assert_eq!(room.lock().next_seq(), first.seq + 1, "no seq was used");
        // Text with escapes compares by its value, not its encoding.
        let tricky = "a \"quoted\" \\ line\nbreak é";
        broker
            .publish_now(&room, &me, &message(tricky, Some("r2")))
            .unwrap();
        let dup = broker
            .publish_now(&room, &me, &message(tricky, Some("r2")))
            .unwrap();
        assert!(dup.duplicate);
    }
}
