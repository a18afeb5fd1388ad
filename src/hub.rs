//! The hub: rooms, their members, their history, and coalesced presence — all local, all sync.
//!
//! The hub never awaits and never touches a socket: delivering means pushing a shared frame into
//! each member's [`Outbox`]. Rooms live in a sharded `DashMap`; each room's state sits behind one
//! short `Mutex`, which is what makes a join atomic: the joiner's history snapshot and its entry
//! in the member list are taken under the same lock as publishes, so a joiner can never miss or
//! double a message between history and live delivery.
//!
//! Sequence numbers and history are kept in the room state on behalf of the in-memory broker
//! (see `broker.rs`); the hub only stores them. The map is bounded by `MAX_ROOMS`: at capacity an
//! empty room is evicted (its history goes, and a new epoch tells resuming clients so).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use slab::Slab;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::outbox::{Outbox, Pushed};
use crate::protocol;

/// Most names listed in one presence event; the count says how many more there were.
const PRESENCE_NAMES: usize = 20;

/// The limits the hub enforces.
#[derive(Debug, Clone)]
pub struct HubSettings {
    pub history_limit: usize,
    pub max_rooms: usize,
    pub outbox_max_bytes: usize,
    pub presence_interval: Duration,
}

/// The room map is full of rooms that still have members.
#[derive(Debug, thiserror::Error)]
#[error("room limit reached and no room is empty")]
pub struct RoomsFull;

/// Where a resuming client says it left off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    pub since: u64,
    pub epoch: Option<String>,
}

/// One stored message.
pub struct HistoryEntry {
    pub seq: u64,
    pub id: uuid::Uuid,
    pub from: Arc<str>,
    pub request_id: Option<Box<str>>,
    /// The inner message object, a slice of the broadcast frame.
    pub json: Bytes,
}

struct Member {
    outbox: Arc<Outbox>,
}

#[derive(Default)]
struct Presence {
    joined: Vec<Arc<str>>,
    joined_count: usize,
    left: Vec<Arc<str>>,
    left_count: usize,
    last_sent: Option<Instant>,
    flush_scheduled: bool,
}

pub struct RoomState {
    evicted: bool,
    /// Upgrades that passed the HTTP checks for this room and have not joined yet; a reserved
    /// room is never evicted, so a 101 is never followed by "no room".
    reserved: usize,
    members: Slab<Member>,
    pub epoch: Arc<str>,
    pub next_seq: u64,
    pub history: VecDeque<HistoryEntry>,
    presence: Presence,
}

pub struct Room {
    pub name: Arc<str>,
    state: Mutex<RoomState>,
}

impl Room {
    fn new(name: Arc<str>) -> Room {
        let epoch: Arc<str> = format!("{:016x}", uuid::Uuid::new_v4().as_u64_pair().0).into();
        Room {
            name,
            state: Mutex::new(RoomState {
                evicted: false,
                reserved: 0,
                members: Slab::new(),
                epoch,
                next_seq: 1,
                history: VecDeque::new(),
                presence: Presence::default(),
            }),
        }
    }

    /// Lock the room. Every update under this lock is completed before it is released, so a
    /// poisoned lock (a panic elsewhere) leaves consistent state and is used as is.
    pub fn lock(&self) -> MutexGuard<'_, RoomState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RoomState {
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    fn is_evictable(&self) -> bool {
        self.members.is_empty() && self.reserved == 0
    }

    /// Push one shared frame to every member. Counted once per call, not once per member.
    pub fn deliver(&self, frame: &Bytes, metrics: &Metrics, outbox_max_bytes: usize) -> usize {
        let mut delivered = 0u64;
        let mut slow = 0u64;
        for (_, m) in self.members.iter() {
            match m.outbox.push(frame, outbox_max_bytes) {
                Pushed::Queued => delivered += 1,
                Pushed::SlowConsumer => slow += 1,
                Pushed::Closed => {}
            }
        }
        metrics.frames_delivered.increment(delivered);
        metrics.bytes_sent.increment(delivered * frame.len() as u64);
        if slow > 0 {
            metrics.slow_consumer_closes.increment(slow);
        }
        delivered as usize
    }

    /// Keep a message, evicting the oldest past `limit`.
    pub fn remember(&mut self, entry: HistoryEntry, limit: usize) {
        if limit == 0 {
            return;
        }
        while self.history.len() >= limit {
            self.history.pop_front();
        }
        self.history.push_back(entry);
    }

    /// The history a joiner gets — how many held entries to skip — and whether it is complete
    /// relative to `resume`.
    pub fn history_for(&self, resume: Option<&Resume>) -> (usize, bool) {
        let Some(r) = resume else { return (0, true) };
        if r.epoch.as_deref() != Some(&*self.epoch) {
            return (0, false);
        }
        let first_held = self.history.front().map_or(self.next_seq, |e| e.seq);
        if r.since >= self.next_seq || r.since + 1 < first_held {
            return (0, false);
        }
        (self.history.partition_point(|e| e.seq <= r.since), true)
    }
}

/// Rooms by name, and the client id counter.
pub struct Hub {
    rooms: DashMap<Arc<str>, Arc<Room>>,
    settings: HubSettings,
    metrics: Metrics,
    next_client_id: AtomicU64,
}

impl Hub {
    pub fn new(settings: HubSettings, metrics: Metrics) -> Hub {
        Hub {
            rooms: DashMap::new(),
            settings,
            metrics,
            next_client_id: AtomicU64::new(1),
        }
    }

    pub fn settings(&self) -> &HubSettings {
        &self.settings
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// The room called `name`, created if needed. At `MAX_ROOMS`, an empty room is evicted to
    /// make space; when none is empty the caller gets [`RoomsFull`].
    pub fn room(&self, name: &str) -> Result<Arc<Room>, RoomsFull> {
        if let Some(r) = self.rooms.get(name) {
            return Ok(r.clone());
        }
        if self.rooms.len() >= self.settings.max_rooms && !self.evict_one_empty_room() {
            return Err(RoomsFull);
        }
        let room = self
            .rooms
            .entry(Arc::from(name))
            .or_insert_with(|| Arc::new(Room::new(Arc::from(name))))
            .clone();
        Ok(room)
    }

    fn evict_one_empty_room(&self) -> bool {
        // Find a candidate without holding a shard lock while removing (DashMap would deadlock).
        let candidate = self
            .rooms
            .iter()
            .find(|r| r.value().lock().is_evictable())
            .map(|r| r.key().clone());
        let Some(name) = candidate else { return false };
        let removed = self
            .rooms
            .remove_if(&name, |_, room| {
                let mut st = room.lock();
                if st.is_evictable() {
                    st.evicted = true;
                    true
                } else {
                    false
                }
            })
            .is_some();
        removed
    }

    /// Reserve a place in `room_name` for an upgrade that passed its checks: the room exists
    /// (created, or made space for) and stays until the reservation joins or is dropped.
    pub fn reserve(&self, room_name: &str) -> Result<RoomReservation, RoomsFull> {
        loop {
            let room = self.room(room_name)?;
            let mut st = room.lock();
            if st.evicted {
                continue; // evicted between lookup and lock: look it up again
            }
            st.reserved += 1;
            drop(st);
            return Ok(RoomReservation { room });
        }
    }

    /// Join the reserved room: queue the greeting and the history snapshot into `outbox`, add
    /// it to the members, and note the join for presence — all under the room lock.
    pub fn join(
        self: &Arc<Self>,
        reservation: RoomReservation,
        outbox: &Arc<Outbox>,
        name: &Arc<str>,
        resume: Option<&Resume>,
    ) -> Membership {
        let client_id = self.next_client_id.fetch_add(1, Ordering::Relaxed);
        let room = reservation.room.clone();
        let mut st = room.lock();
        let (skip, complete) = st.history_for(resume);
        let greeting = protocol::system_connected(name, client_id);
        let history = protocol::history_event(
            &room.name,
            &st.epoch,
            complete,
            st.history.iter().skip(skip).map(|e| &e.json),
        );
        // Greeting and history may exceed a tiny OUTBOX_MAX_BYTES; they are sent regardless.
        let limit = usize::MAX;
        outbox.push(&greeting, limit);
        outbox.push(&history, limit);
        self.metrics.frames_delivered.increment(2);
        self.metrics
            .bytes_sent
            .increment((greeting.len() + history.len()) as u64);
        let key = st.members.insert(Member {
            outbox: outbox.clone(),
        });
        self.note_presence(&room, &mut st, Some(name.clone()), None);
        drop(st);
        drop(reservation); // the room has a member now; it stays without the reservation
        Membership {
            room,
            key,
            client_id,
        }
    }

    /// Leave the room joined through `membership`.
    pub fn leave(self: &Arc<Self>, membership: &Membership, name: &Arc<str>) {
        let mut st = membership.room.lock();
        if st.members.try_remove(membership.key).is_some() {
            self.note_presence(&membership.room, &mut st, None, Some(name.clone()));
        }
    }

    /// Record a join or leave and send presence now (leading edge) or schedule one coalesced
    /// event per room at most every `presence_interval` — so a join storm of N costs O(N) frames.
    fn note_presence(
        self: &Arc<Self>,
        room: &Arc<Room>,
        st: &mut RoomState,
        joined: Option<Arc<str>>,
        left: Option<Arc<str>>,
    ) {
        let p = &mut st.presence;
        if let Some(n) = joined {
            p.joined_count += 1;
            if p.joined.len() < PRESENCE_NAMES {
                p.joined.push(n);
            }
        }
        if let Some(n) = left {
            p.left_count += 1;
            if p.left.len() < PRESENCE_NAMES {
                p.left.push(n);
            }
        }
        if p.flush_scheduled {
            return;
        }
        let interval = self.settings.presence_interval;
        let now = Instant::now();
        match p.last_sent {
            Some(t) if now < t + interval => {
                p.flush_scheduled = true;
                let (hub, room) = (self.clone(), room.clone());
                let at = t + interval;
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    let mut st = room.lock();
                    st.presence.flush_scheduled = false;
                    hub.flush_presence(&mut st);
                });
            }
            _ => self.flush_presence(st),
        }
    }

    fn flush_presence(&self, st: &mut RoomState) {
        let p = std::mem::take(&mut st.presence);
        st.presence.last_sent = Some(Instant::now());
        if p.joined_count + p.left_count == 0 || st.members.is_empty() {
            return;
        }
        let message = presence_message(&p);
        let frame = protocol::presence_event(&message, st.members.len(), &p.joined, &p.left);
        st.deliver(&frame, &self.metrics, self.settings.outbox_max_bytes);
    }
}

fn describe_names(names: &[Arc<str>], count: usize, verb: &str) -> String {
    let shown = names.len().min(3);
    let listed = names[..shown].join(", ");
    match count - shown {
        0 => format!("{listed} {verb}"),
        1 => format!("{listed} and 1 other {verb}"),
        more => format!("{listed} and {more} others {verb}"),
    }
}

fn presence_message(p: &Presence) -> String {
    let mut parts = Vec::with_capacity(2);
    if p.joined_count > 0 {
        parts.push(describe_names(&p.joined, p.joined_count, "joined"));
    }
    if p.left_count > 0 {
        parts.push(describe_names(&p.left, p.left_count, "left"));
    }
    parts.join("; ")
}

/// A room held for an upgrade between its HTTP checks and its join (see [`Hub::reserve`]).
pub struct RoomReservation {
    room: Arc<Room>,
}

impl Drop for RoomReservation {
    fn drop(&mut self) {
        self.room.lock().reserved -= 1;
    }
}

impl std::fmt::Debug for RoomReservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomReservation")
            .field("room", &self.room.name)
            .finish()
    }
}

/// A connection's place in a room; given back to [`Hub::leave`].
pub struct Membership {
    pub room: Arc<Room>,
    key: usize,
    pub client_id: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(max_rooms: usize) -> Arc<Hub> {
        Arc::new(Hub::new(
            HubSettings {
                history_limit: 3,
                max_rooms,
                outbox_max_bytes: 1 << 20,
                presence_interval: Duration::from_millis(100),
            },
            Metrics::new(),
        ))
    }

    fn entry(seq: u64) -> HistoryEntry {
        HistoryEntry {
            seq,
            id: uuid::Uuid::nil(),
            from: "a".into(),
            request_id: None,
            json: Bytes::from(format!("{{\"seq\":{seq}}}")),
        }
    }

    #[test]
    fn resume_gives_the_exact_tail_or_says_incomplete() {
        let room = Room::new("r".into());
        let mut st = room.lock();
        for seq in 1..=5 {
            st.remember(entry(seq), 3);
            st.next_seq = seq + 1;
        }
        let epoch = Some(st.epoch.to_string());
        assert_eq!(st.history_for(None), (0, true));
        assert_eq!(
            st.history_for(Some(&Resume {
                since: 4,
                epoch: epoch.clone()
            })),
            (2, true)
        );
        assert_eq!(
            st.history_for(Some(&Resume {
                since: 2,
                epoch: epoch.clone()
            })),
            (0, true)
        );
        assert_eq!(
            st.history_for(Some(&Resume {
                since: 5,
                epoch: epoch.clone()
            })),
            (3, true)
        );
        assert_eq!(
            st.history_for(Some(&Resume {
                since: 1,
                epoch: epoch.clone()
            })),
            (0, false),
            "seq 2 was evicted"
        );
        assert_eq!(
            st.history_for(Some(&Resume { since: 9, epoch })),
            (0, false),
            "seq from the future"
        );
        assert_eq!(
            st.history_for(Some(&Resume {
                since: 4,
                epoch: Some("other".into())
            })),
            (0, false)
        );
    }

    #[tokio::test]
    async fn full_room_map_evicts_an_empty_room_but_never_an_occupied_one() {
        let hub = hub(2);
        let outbox = Arc::new(Outbox::default());
        let name: Arc<str> = "n".into();
        let _m = hub.join(hub.reserve("busy").unwrap(), &outbox, &name, None);
        let quiet = hub.room("quiet").unwrap();
        assert!(hub.room("third").is_ok(), "the empty room made space");
        assert!(quiet.lock().evicted);
        let _m2 = hub.join(hub.reserve("third").unwrap(), &outbox, &name, None);
        assert!(hub.room("fourth").is_err());
    }

    #[tokio::test]
    async fn a_reserved_room_is_never_evicted() {
        let hub = hub(1);
        let held = hub.reserve("held").unwrap();
        assert!(
            hub.reserve("other").is_err(),
            "the only room is reserved, so not evictable"
        );
        let outbox = Arc::new(Outbox::default());
        let _m = hub.join(held, &outbox, &"n".into(), None);
        assert_eq!(hub.room_count(), 1);
    }

    #[test]
    fn presence_messages_name_a_few_and_count_the_rest() {
        let mut p = Presence::default();
        for n in ["a", "b", "c", "d", "e"] {
            p.joined.push(n.into());
            p.joined_count += 1;
        }
        p.left.push("z".into());
        p.left_count = 1;
        assert_eq!(presence_message(&p), "a, b, c and 2 others joined; z left");
        let one = Presence {
            joined: vec!["ada".into()],
            joined_count: 1,
            ..Default::default()
        };
        assert_eq!(presence_message(&one), "ada joined");
    }
}
