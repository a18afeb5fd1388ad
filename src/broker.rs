//! The broker seam: every publish goes through a [`Broker`], even on one node.
//!
//! A broker decides a message's identity and order (id, per-room `seq`), keeps history for
//! resume and de-duplication, and gets the encoded frame to every local member. The in-memory
//! broker does all of that inside the room's lock, in one step. A Redis broker (several nodes)
//! would assign `seq` and keep history in Redis and call the hub's local delivery when its
//! subscription receives the message; connection code would not change, because it only ever
//! calls [`Broker::publish`].

use std::sync::Arc;

use crate::hub::{HistoryEntry, Hub, Room};
use crate::protocol::{self, ClientMessage};

/// What a publish did, for the sender's ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub id: uuid::Uuid,
    pub seq: u64,
    /// True when the same name already published this `requestId` in this room, within the
    /// history window: nothing was broadcast again.
    pub duplicate: bool,
}

pub trait Broker: Send + Sync + 'static {
    /// Publish `message` from `from` into `room`. Must not block or await.
    fn publish(&self, room: &Room, from: &Arc<str>, message: &ClientMessage<'_>) -> Published;
}

/// Single-node broker: ordering and history live in the room state in this process.
pub struct MemoryBroker {
    hub: Arc<Hub>,
}

impl MemoryBroker {
    pub fn new(hub: Arc<Hub>) -> MemoryBroker {
        MemoryBroker { hub }
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, room: &Room, from: &Arc<str>, message: &ClientMessage<'_>) -> Published {
        let settings = self.hub.settings();
        let metrics = self.hub.metrics();
        let mut st = room.lock();
        if let Some(rid) = message.request_id.as_deref() {
            let seen = st
                .history
                .iter()
                .rev()
                .find(|e| e.request_id.as_deref() == Some(rid) && e.from == *from);
            if let Some(e) = seen {
                return Published {
                    id: e.id,
                    seq: e.seq,
                    duplicate: true,
                };
            }
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let id = uuid::Uuid::new_v4();
        let sent_at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let (frame, inner) = protocol::message_event(&protocol::MessageFields {
            id: &id,
            room: &room.name,
            from,
            text: &message.text,
            sent_at: &sent_at,
            seq,
        });
        let entry = HistoryEntry {
            seq,
            id,
            from: from.clone(),
            request_id: message.request_id.as_deref().map(Box::from),
            json: inner,
        };
        st.remember(entry, settings.history_limit);
        let recipients = st.deliver(&frame, metrics, settings.outbox_max_bytes);
        metrics.publish_recipients.record(recipients as f64);
        Published {
            id,
            seq,
            duplicate: false,
        }
    }
}
