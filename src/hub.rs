//! The hub: rooms, their members, their history, and coalesced presence — all local, all sync.
//!
//! The hub never awaits and never touches a socket: delivering means pushing a shared frame into
//! each member's [`Outbox`]. Rooms live in a sharded `DashMap`; each room's state sits behind one
//! std `Mutex` that is only ever held for a few small steps, never for a fan-out.
//!
//! **Publishing and ordered delivery.** Under the room lock a publish only gives the message its
//! `seq`, appends it to history and queues `(frame, member snapshot)` on the room's delivery
//! queue. The snapshot is an `Arc<[Arc<Outbox>]>` built copy-on-write: rebuilt (O(members)) only
//! by the first publish after a join or leave, shared by every publish until the next one. The
//! fan-out itself happens outside the lock, in [`Hub::settle`]: whoever finds no delivery in
//! progress claims it (a flag under the lock) and drains the queue, popping one entry at a time
//! under the lock and pushing to its members without it; everyone else only enqueues. One
//! deliverer per room at a time, popping in queue order, is what keeps every member's frames in
//! `seq` order. A deliverer that has pushed `DRAIN_PUSHES` frames hands the rest of the queue to
//! a task of its own, so one connection does not spend its turn delivering a busy room's traffic.
//!
//! **Bounds.** The delivery queue holds at most [`DELIVERY_QUEUE_MAX`] broadcast frames per room.
//! A publish that finds it full is refused before it gets a `seq` ([`RoomState::delivery_full`];
//! the sender gets `rate_limited`); a presence event that finds it full waits one more interval.
//! A connection's own answers (acks, error events) go through the same queue while it is busy
//! ([`Hub::send_in_order`]), so they never overtake the messages they answer; they may take it
//! to twice the bound, and past that are pushed at once.
//!
//! **Joins stay exact.** A joiner's greeting and history snapshot are queued into its outbox and
//! it is added to the members under the room lock. Frames already queued carry snapshots taken
//! before it joined, frames queued later carry it: it gets every message exactly once — from
//! history if its `seq` was assigned before the join, live otherwise — and live ones after its
//! history. Leaving is a [`Membership`] drop guard, so a panicking connection task still leaves.
//!
//! **Members** are a `BTreeMap` keyed by the relay's unique client id (not a `Slab`, which never
//! shrinks). A B-tree's nodes are merged and freed as entries go, so its memory follows the
//! member count down with no shrink step to get wrong. And it iterates in client-id order,
//! which is join order, which is the order the outboxes were allocated in: the snapshot built
//! from it walks memory sequentially during fan-out. A `HashMap` here (random order) made a
//! 10,000-member fan-out 12–18% slower in `benches/relay.rs`, from cache misses alone.
//!
//! **MAX_ROOMS.** At capacity the empty room that has been empty longest is evicted (its history
//! goes, and a new epoch tells resuming clients so). Empty, unreserved rooms are kept in an
//! ordered index keyed by (the hub clock when they became empty, room id); a room leaves it when
//! it gets a member or a reservation. Eviction takes the first entry: no scan of all rooms.
//!
//! **HISTORY_MAX_BYTES.** History frames are stored at exact size and each entry is charged its
//! frame, its requestId and its own struct against one process-wide count. Past the budget the
//! history of the room that published least recently is dropped whole (its `seq` and epoch stay,
//! so a resume into it gets `complete:false`). Rooms holding history are listed in a second
//! ordered index keyed by (the room's last-publish stamp *when listed*, room id). A publish only
//! writes its stamp into the room state — it takes no shared lock and touches no index; a room
//! is listed once, when its history becomes non-empty. Enforcing the budget takes the first
//! entry: if the room has published since it was listed, it is re-listed under its current stamp
//! and the next entry is tried; otherwise it is the least recently published room (every other
//! entry's stamp is ≤ its room's current stamp and ≥ this one) and its history goes. Each
//! re-listing pays for at least one publish, so the cost is O(log rooms) per publish at most,
//! and only while the process is over budget.
//!
//! **Lock order:** DashMap shard → room → (empty-room index | history index). The two index locks
//! are leaves; no two room locks are ever held at once.
//!
//! Sequence numbers and history are kept in the room state on behalf of the in-memory broker
//! (see `broker.rs`); the hub only stores them.
//!
//! **Following a networked broker.** With the Redis broker (`broker_redis`), `seq`, epoch and
//! history belong to Redis, and a room's state here is a mirror of it, kept only while the room
//! has local members ([`Follower`]). A room the node does not follow yet makes its first joiner
//! wait (no greeting) while the broker subscribes and reads a snapshot; [`Hub::apply_snapshot`]
//! then fills the mirror, delivers what the members already here missed, applies what arrived on
//! the channel meanwhile, and greets the waiting joiners — so joins stay exact across nodes.
//! Messages from the channel ([`Hub::deliver_remote`]) take the same ordered local path as a
//! local publish; a `seq` jump or a new epoch sends the room back for a snapshot first.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::outbox::{Outbox, Pushed};
use crate::protocol;

/// Most names listed in one presence event; the count says how many more there were.
const PRESENCE_NAMES: usize = 20;
/// Frames waiting for delivery in one room. Each entry pins its frame and a member snapshot;
/// at 10,000 members a frame takes about a millisecond to deliver, so this is a quarter second
/// of backlog before publishers into the room are told to slow down.
pub const DELIVERY_QUEUE_MAX: usize = 256;
/// What [`Hub::push_all`] did: the outboxes that took the frame, and how many of those had it
/// written to their socket at once.
struct PushedAll {
    delivered: usize,
    written: usize,
}

/// Outbox pushes one deliverer makes before handing the rest of the queue to a task.
const DRAIN_PUSHES: usize = 16 * 1024;
/// What one direct write (a `send` to an idle member's socket, `Outbox::push_or_write`) counts
/// against `DRAIN_PUSHES`: a system call costs about as much as this many queue pushes.
const DIRECT_WRITE_COST: usize = 16;
/// Channel messages kept while a room waits for its snapshot; past it they are dropped (the
/// snapshot and the next gap fill bring them back).
const REMOTE_BUFFER_MAX: usize = 4 * DELIVERY_QUEUE_MAX;
/// A followed room's delivery queue may hold this many channel messages; past it the room is
/// read again from Redis rather than queue without bound.
const REMOTE_QUEUE_MAX: usize = 4 * DELIVERY_QUEUE_MAX;
/// Wait before a failed snapshot read is tried again.
const SYNC_RETRY: Duration = Duration::from_millis(500);
/// Shortest wait before presence is tried again when the delivery queue is full.
const PRESENCE_RETRY_MIN: Duration = Duration::from_millis(10);

/// The limits the hub enforces.
#[derive(Debug, Clone)]
pub struct HubSettings {
    pub history_limit: usize,
    /// Bytes of history across all rooms (see the module docs for what an entry is charged).
    pub history_max_bytes: usize,
    pub max_rooms: usize,
    pub outbox_max_bytes: usize,
    pub presence_interval: Duration,
    /// FLUSH_DELAY_MS: a busy room of at least `flush_min_members` wakes its members once per
    /// window (see [`FlushWindow`]); zero never delays.
    pub flush_delay: Duration,
    pub flush_min_members: usize,
}

/// What the hub asks of a networked broker: follow a room (subscribe to it and read its snapshot,
/// then call [`Hub::apply_snapshot`] with the same generation) or stop following it.
pub trait Follower: Send + Sync {
    fn follow(&self, room: &Arc<Room>, generation: u64);
    fn unfollow(&self, room: &Arc<Room>);
    /// This node's coalesced joins and leaves for a room, and its member count now: the broker
    /// counts the room across nodes and sends the presence event to every node's members.
    fn presence(
        &self,
        room: &Arc<Room>,
        local_members: usize,
        message: String,
        joined: &[Arc<str>],
        left: &[Arc<str>],
    );
}

/// A room's snapshot as read from a networked broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomSnapshot {
    pub epoch: String,
    /// The last `seq` the room has used (0: none yet).
    pub seq: u64,
    /// History (seq, inner message object), oldest first.
    pub history: Vec<(u64, Vec<u8>)>,
}

/// How a room's state relates to a networked broker.
enum Mirror {
    /// The in-memory broker: the state here is the truth.
    Local,
    /// Not followed: no local members, no subscription; the state here is stale.
    Unfollowed,
    /// Waiting for a snapshot; channel messages are kept meanwhile.
    Pending(Vec<(Arc<str>, u64, Bytes)>),
    /// Mirrors the broker and receives its channel.
    Synced,
}

/// A joiner: admitted at once, or waiting for its room's snapshot.
struct Waiting {
    client_id: u64,
    outbox: Arc<Outbox>,
    sender: Arc<Sender>,
    resume: Option<Resume>,
    greeting: Greeting,
}

/// Which client dialect a joiner speaks: what it is greeted with and which frames it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Greeting {
    /// The first dialect (`/chat?room=..`): a `system` greeting and the history event, then
    /// messages and presence events.
    Query,
    /// The second dialect (`join` over `GET /`): `joined`, the history only when asked for
    /// (`history` or a resume), then chat events; no presence events.
    Auth { history: bool },
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

/// Who publishes. The session is issued by the relay and is the identity (requestIds are
/// de-duplicated per session); the name is a display label and is never used as a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender {
    pub name: Arc<str>,
    pub session: u128,
}

/// One stored message.
pub struct HistoryEntry {
    pub seq: u64,
    pub id: uuid::Uuid,
    /// The publisher's session, for requestId de-duplication.
    pub session: u128,
    pub request_id: Option<Box<str>>,
    /// The inner message object, a slice of the broadcast frame.
    pub json: Bytes,
    /// Bytes this entry keeps alive, as counted against `HISTORY_MAX_BYTES`.
    charge: usize,
}

impl HistoryEntry {
    /// `frame_bytes` is the length of the frame `json` is a slice of: the entry keeps all of it.
    pub fn new(
        seq: u64,
        id: uuid::Uuid,
        session: u128,
        request_id: Option<&str>,
        json: Bytes,
        frame_bytes: usize,
    ) -> HistoryEntry {
        let charge = std::mem::size_of::<HistoryEntry>()
            + frame_bytes.max(json.len())
            + request_id.map_or(0, str::len);
        HistoryEntry {
            seq,
            id,
            session,
            request_id: request_id.map(Box::from),
            json,
            charge,
        }
    }

    /// Bytes counted against `HISTORY_MAX_BYTES` for this entry.
    pub fn charged_bytes(&self) -> usize {
        self.charge
    }
}

/// The members a frame goes to, shared by every frame queued between two membership changes:
/// one allocation, first-dialect members first, then second-dialect members.
#[derive(Clone)]
struct Snapshot {
    all: Arc<[Arc<Outbox>]>,
    /// How many of `all` speak the first dialect.
    query: usize,
}

impl Snapshot {
    fn query(&self) -> &[Arc<Outbox>] {
        &self.all[..self.query]
    }

    fn auth(&self) -> &[Arc<Outbox>] {
        &self.all[self.query..]
    }
}

/// Who a queued frame goes to.
enum Recipients {
    /// The members when it was queued: a published message (its delivery is recorded in
    /// `roomcast_publish_recipients`). The frame is the first dialect's; the stored message
    /// object (a slice of it) is what the second dialect's chat event is built from, once, by
    /// the deliverer, when the room has such members.
    Message(Snapshot, Bytes),
    /// The first-dialect members when it was queued: a presence or history event.
    Members(Snapshot),
    /// A few connections picked under the lock (second-dialect members told of a gap).
    List(Box<[Arc<Outbox>]>),
    /// One connection (its ack or error event, kept behind the messages it answers).
    One(Arc<Outbox>),
}

/// A frame waiting for delivery.
struct Queued {
    frame: Bytes,
    to: Recipients,
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

/// Everything about a room that changes, behind its lock.
pub struct RoomState {
    evicted: bool,
    /// Upgrades that passed the HTTP checks for this room and have not joined yet; a reserved
    /// room is never evicted, so a 101 is never followed by "no room".
    reserved: usize,
    /// Set while the room is listed in the hub's empty-room index: the stamp it is listed under.
    empty_since: Option<u64>,
    /// First-dialect members by client id (see the module docs for why a B-tree), and who
    /// they are (the server API lists and disconnects members by name).
    members: BTreeMap<u64, (Arc<Outbox>, Arc<Sender>)>,
    /// Second-dialect members by client id, who they are, and whether they asked for history
    /// (they are the ones told when a gap loses messages).
    chat_members: BTreeMap<u64, (Arc<Outbox>, Arc<Sender>, bool)>,
    /// The members as of the last snapshot; `None` once membership changed since.
    snapshot: Option<Snapshot>,
    epoch: Arc<str>,
    next_seq: u64,
    /// Hub clock at this room's last publish (the history budget's recency).
    last_publish: u64,
    history: VecDeque<HistoryEntry>,
    /// Sum of the entries' charges.
    history_bytes: usize,
    /// Set while the room is listed in the hub's history index: the stamp it is listed under.
    history_listed: Option<u64>,
    queue: VecDeque<Queued>,
    /// Someone is delivering this room's queue (only they pop from it).
    delivering: bool,
    presence: Presence,
    mirror: Mirror,
    /// Joiners waiting for the snapshot (networked broker only).
    waiting: Vec<Waiting>,
    /// Which follow request a snapshot answers (stale snapshots are ignored).
    generation: u64,
}

/// One room: its name and its state.
pub struct Room {
    name: Arc<str>,
    /// Unique per room created (a name can come back after an eviction): the indexes' tie-break.
    id: u64,
    hub: Weak<Hub>,
    state: Mutex<RoomState>,
    /// Coalesced wake-ups of a large, busy room's members (FLUSH_DELAY_MS).
    flush: Mutex<FlushWindow>,
}

/// A large room's flush window (FLUSH_DELAY_MS). A message into a room with no open window is
/// pushed and its members woken at once, and a window opens; messages delivered while it is open
/// are pushed without waking anyone, and when it ends the members of the latest of them are
/// woken once, so each writes everything queued in one system call. A window that coalesced
/// something is followed by another; one that did not closes. So a room that publishes rarely
/// pays nothing, and a busy one adds at most one window to a message's latency while its
/// members make one write per window instead of one per message (the hot-room target: under
/// 0.5 writes per delivered frame).
#[derive(Default)]
struct FlushWindow {
    open: bool,
    /// Whom to wake when the window ends: the recipients of the latest message it held back
    /// (every member that has frames waiting is among them, or left the room).
    wake: Option<Snapshot>,
}

/// Lock a mutex whose every update is completed before it is released: a poisoned lock (a
/// panic elsewhere) leaves consistent state and is used as is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Room {
    fn new(name: Arc<str>, id: u64, hub: Weak<Hub>, followed: bool) -> Room {
        let epoch: Arc<str> = format!("{:016x}", uuid::Uuid::new_v4().as_u64_pair().0).into();
        Room {
            name,
            id,
            hub,
            flush: Mutex::default(),
            state: Mutex::new(RoomState {
                evicted: false,
                reserved: 0,
                empty_since: None,
                members: BTreeMap::new(),
                chat_members: BTreeMap::new(),
                snapshot: None,
                epoch,
                next_seq: 1,
                last_publish: 0,
                history: VecDeque::new(),
                history_bytes: 0,
                history_listed: None,
                queue: VecDeque::new(),
                delivering: false,
                presence: Presence::default(),
                mirror: if followed {
                    Mirror::Unfollowed
                } else {
                    Mirror::Local
                },
                waiting: Vec::new(),
                generation: 0,
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Lock the room. Hold it only for small steps: never deliver under it.
    pub fn lock(&self) -> MutexGuard<'_, RoomState> {
        lock(&self.state)
    }
}

impl RoomState {
    pub fn member_count(&self) -> usize {
        self.members.len() + self.chat_members.len()
    }

    fn has_members(&self) -> bool {
        !self.members.is_empty() || !self.chat_members.is_empty()
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The `seq` the next message will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Give the next message its `seq`.
    pub fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Stored messages, oldest first.
    pub fn history(&self) -> impl Iterator<Item = &HistoryEntry> + '_ {
        self.history.iter()
    }

    /// Bytes of history this room is charged.
    pub fn history_bytes(&self) -> usize {
        self.history_bytes
    }

    /// The stored message `session` published with `request_id`, if still in history.
    pub fn find_request(&self, session: u128, request_id: &str) -> Option<&HistoryEntry> {
        self.history
            .iter()
            .rev()
            .find(|e| e.session == session && e.request_id.as_deref() == Some(request_id))
    }

    /// The delivery queue is at its bound: a publish must be refused before it takes a `seq`.
    pub fn delivery_full(&self) -> bool {
        self.queue.len() >= DELIVERY_QUEUE_MAX
    }

    /// Queue a published message for everyone who is a member now, behind what is already
    /// queued; it is delivered by [`Hub::settle`], outside the lock (which also records how many
    /// members it reached). Returns how many members that is. Callers check
    /// [`RoomState::delivery_full`] first: that is what bounds the queue.
    pub fn enqueue(&mut self, event: protocol::MessageEvent) -> usize {
        debug_assert!(
            self.queue.len() <= DELIVERY_QUEUE_MAX,
            "callers keep the bound"
        );
        self.enqueue_unchecked(event)
    }

    /// Queue a message from the networked broker's channel (bounded by its caller instead of
    /// [`RoomState::delivery_full`]: Redis, not a local publisher, sets its pace).
    fn enqueue_unchecked(&mut self, event: protocol::MessageEvent) -> usize {
        let to = self.snapshot();
        let recipients = to.all.len();
        self.queue.push_back(Queued {
            frame: event.frame,
            to: Recipients::Message(to, event.inner),
        });
        recipients
    }

    /// The members now, for a published message: built on the first publish after a join or
    /// leave and kept for the next ones (copy-on-write), so a busy room builds it once per
    /// membership change, not once per message.
    fn snapshot(&mut self) -> Snapshot {
        if self.snapshot.is_none() {
            self.snapshot = Some(self.members_now());
        }
        self.snapshot.clone().expect("just built")
    }

    /// The members now, for a presence or history event: the kept snapshot when there is one,
    /// otherwise built for this event only. A room that only hears presence (an idle room) keeps
    /// no snapshot between events: 8 bytes per member it does not hold.
    fn transient_snapshot(&self) -> Snapshot {
        self.snapshot.clone().unwrap_or_else(|| self.members_now())
    }

    fn members_now(&self) -> Snapshot {
        Snapshot {
            all: self
                .members
                .values()
                .map(|(o, _)| o)
                .chain(self.chat_members.values().map(|(o, _, _)| o))
                .cloned()
                .collect(),
            query: self.members.len(),
        }
    }

    fn is_evictable(&self) -> bool {
        !self.has_members() && self.waiting.is_empty() && self.reserved == 0
    }

    /// Members here or joiners waiting: a networked broker's room must be followed.
    fn wants_following(&self) -> bool {
        self.has_members() || !self.waiting.is_empty()
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

/// An ordered index of rooms: (stamp, room id) → room.
type RoomIndex = Mutex<BTreeMap<(u64, u64), Weak<Room>>>;

/// Rooms by name, the indexes that keep MAX_ROOMS and HISTORY_MAX_BYTES cheap, and the client
/// id counter.
pub struct Hub {
    rooms: DashMap<Arc<str>, Arc<Room>>,
    settings: HubSettings,
    metrics: Metrics,
    next_client_id: AtomicU64,
    next_room_id: AtomicU64,
    /// Orders events (a room becoming empty, a publish) across rooms.
    clock: AtomicU64,
    /// Empty, unreserved rooms by when they became empty.
    empty_rooms: RoomIndex,
    /// Rooms holding history, by their last publish when listed (see the module docs).
    history_rooms: RoomIndex,
    history_bytes: AtomicUsize,
    /// The networked broker whose rooms this hub mirrors; unset with the in-memory broker.
    follower: std::sync::OnceLock<Weak<dyn Follower>>,
}

impl Hub {
    pub fn new(settings: HubSettings, metrics: Metrics) -> Hub {
        Hub {
            rooms: DashMap::new(),
            settings,
            metrics,
            next_client_id: AtomicU64::new(1),
            next_room_id: AtomicU64::new(1),
            clock: AtomicU64::new(1),
            empty_rooms: Mutex::default(),
            history_rooms: Mutex::default(),
            history_bytes: AtomicUsize::new(0),
            follower: std::sync::OnceLock::new(),
        }
    }

    /// Mirror the rooms of a networked broker from now on (set once, before any room exists).
    pub fn set_follower(&self, follower: Weak<dyn Follower>) {
        let _ = self.follower.set(follower);
    }

    fn follower(&self) -> Option<Arc<dyn Follower>> {
        self.follower.get().and_then(Weak::upgrade)
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

    /// Bytes of history held across all rooms, as charged against `HISTORY_MAX_BYTES`.
    pub fn history_bytes(&self) -> usize {
        self.history_bytes.load(Ordering::Relaxed)
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// The room called `name`, created if needed. At `MAX_ROOMS`, the empty room idle longest is
    /// evicted to make space; when none is empty the caller gets [`RoomsFull`].
    pub fn room(self: &Arc<Self>, name: &str) -> Result<Arc<Room>, RoomsFull> {
        if let Some(r) = self.rooms.get(name) {
            return Ok(r.clone());
        }
        if self.rooms.len() >= self.settings.max_rooms && !self.evict_one_empty_room() {
            return Err(RoomsFull);
        }
        let room = self
            .rooms
            .entry(Arc::from(name))
            .or_insert_with(|| {
                let id = self.next_room_id.fetch_add(1, Ordering::Relaxed);
                let followed = self.follower.get().is_some();
                let room = Arc::new(Room::new(
                    Arc::from(name),
                    id,
                    Arc::downgrade(self),
                    followed,
                ));
                self.sync_empty_listing(&room, &mut room.lock());
                room
            })
            .clone();
        Ok(room)
    }

    /// Keep the empty-room index in step with the room: listed exactly while it is empty,
    /// unreserved and not evicted. Called under the room lock after every change to those.
    fn sync_empty_listing(&self, room: &Arc<Room>, st: &mut RoomState) {
        let evictable = st.is_evictable() && !st.evicted;
        match (evictable, st.empty_since) {
            (true, None) => {
                let stamp = self.tick();
                lock(&self.empty_rooms).insert((stamp, room.id), Arc::downgrade(room));
                st.empty_since = Some(stamp);
            }
            (false, Some(stamp)) => {
                lock(&self.empty_rooms).remove(&(stamp, room.id));
                st.empty_since = None;
            }
            _ => {}
        }
    }

    /// Evict the room that has been empty longest. False when no room is empty.
    fn evict_one_empty_room(&self) -> bool {
        loop {
            let first = lock(&self.empty_rooms)
                .first_key_value()
                .map(|(key, room)| (*key, room.clone()));
            let Some((key, room)) = first else {
                return false;
            };
            let Some(room) = room.upgrade() else {
                lock(&self.empty_rooms).remove(&key);
                continue;
            };
            // The index lock is not held here: DashMap shard, then room, then index.
            let removed = self
                .rooms
                .remove_if(&room.name, |_, r| {
                    if !Arc::ptr_eq(r, &room) {
                        return false;
                    }
                    let mut st = r.lock();
                    let evictable = st.empty_since == Some(key.0) && st.is_evictable();
                    if evictable {
                        self.retire(r, &mut st);
                    }
                    evictable
                })
                .is_some();
            if removed {
                return true;
            }
            // It got a member or a reservation meanwhile (and left the index itself), or the
            // entry is stale: make sure it is gone, then try the next one.
            let mut st = room.lock();
            if st.empty_since == Some(key.0) {
                lock(&self.empty_rooms).remove(&key);
                st.empty_since = None;
            }
        }
    }

    /// Take an evicted room out of both indexes and drop its history. Under its lock.
    fn retire(&self, room: &Room, st: &mut RoomState) {
        st.evicted = true;
        if let Some(stamp) = st.empty_since.take() {
            lock(&self.empty_rooms).remove(&(stamp, room.id));
        }
        self.drop_history(room, st);
    }

    /// Drop a room's whole history (its `seq` and epoch stay). Under its lock.
    fn drop_history(&self, room: &Room, st: &mut RoomState) {
        if let Some(stamp) = st.history_listed.take() {
            lock(&self.history_rooms).remove(&(stamp, room.id));
        }
        self.history_bytes
            .fetch_sub(st.history_bytes, Ordering::Relaxed);
        st.history_bytes = 0;
        st.history = VecDeque::new();
    }

    /// Reserve a place in `room_name` for an upgrade that passed its checks: the room exists
    /// (created, or made space for) and stays until the reservation joins or is dropped.
    pub fn reserve(self: &Arc<Self>, room_name: &str) -> Result<RoomReservation, RoomsFull> {
        loop {
            let room = self.room(room_name)?;
            let mut st = room.lock();
            if st.evicted {
                continue; // evicted between lookup and lock: look it up again
            }
            st.reserved += 1;
            self.sync_empty_listing(&room, &mut st);
            drop(st);
            return Ok(RoomReservation { room });
        }
    }

    /// Join the reserved room: queue the greeting and the history snapshot into `outbox`, add
    /// it to the members, and note the join for presence — all under the room lock. In a room a
    /// networked broker has not given us yet, the joiner waits for the snapshot instead.
    pub fn join(
        self: &Arc<Self>,
        reservation: RoomReservation,
        outbox: &Arc<Outbox>,
        sender: Arc<Sender>,
        resume: Option<&Resume>,
        greeting: Greeting,
    ) -> Membership {
        let client_id = self.next_client_id.fetch_add(1, Ordering::Relaxed);
        let room = reservation.room.clone();
        let joiner = Waiting {
            client_id,
            outbox: outbox.clone(),
            sender: sender.clone(),
            resume: resume.cloned(),
            greeting,
        };
        let mut st = room.lock();
        let mut follow = None;
        match st.mirror {
            Mirror::Local | Mirror::Synced => {
                self.admit(&room, &mut st, &joiner);
            }
            Mirror::Unfollowed | Mirror::Pending(_) => {
                st.waiting.push(joiner);
                if matches!(st.mirror, Mirror::Unfollowed) {
                    st.mirror = Mirror::Pending(Vec::new());
                    st.generation += 1;
                    follow = Some(st.generation);
                }
                self.sync_empty_listing(&room, &mut st);
            }
        }
        drop(st);
        drop(reservation); // the room has a member now; it stays without the reservation
        if let (Some(generation), Some(f)) = (follow, self.follower()) {
            f.follow(&room, generation);
        }
        self.settle(&room);
        Membership {
            room,
            client_id,
            sender,
        }
    }

    /// Greet a joiner from the room's state and make it a member. Under the room lock.
    fn admit(self: &Arc<Self>, room: &Arc<Room>, st: &mut RoomState, joiner: &Waiting) {
        let Waiting {
            client_id,
            outbox,
            sender,
            resume,
            greeting,
        } = joiner;
        let (client_id, resume, greeting) = (*client_id, resume.as_ref(), *greeting);
        let (skip, complete) = st.history_for(resume);
        let held = st.history.iter().skip(skip).map(|e| &e.json);
        let (hello, history) = match greeting {
            Greeting::Query => (
                protocol::system_connected(&sender.name, client_id, sender.session),
                Some(protocol::history_event(
                    &room.name, &st.epoch, complete, held,
                )),
            ),
            Greeting::Auth { history } => (
                protocol::auth::joined(&room.name),
                (history || resume.is_some())
                    .then(|| protocol::auth::history_event(&room.name, &st.epoch, complete, held)),
            ),
        };
        // Greeting and history may exceed a tiny OUTBOX_MAX_BYTES; they are sent regardless.
        let limit = usize::MAX;
        let mut bytes = 0;
        for frame in std::iter::once(&hello).chain(history.as_ref()) {
            outbox.push(frame, limit);
            self.metrics.frames_delivered.increment(1);
            bytes += frame.len();
        }
        self.metrics.bytes_sent.increment(bytes as u64);
        match greeting {
            Greeting::Query => {
                crate::alloc::long_lived(|| {
                    st.members
                        .insert(client_id, (outbox.clone(), sender.clone()))
                });
            }
            Greeting::Auth { history } => {
                let told_of_gaps = history || resume.is_some();
                crate::alloc::long_lived(|| {
                    st.chat_members
                        .insert(client_id, (outbox.clone(), sender.clone(), told_of_gaps))
                });
            }
        }
        st.snapshot = None;
        self.sync_empty_listing(room, st);
        self.note_presence(room, st, Some(sender.name.clone()), None);
    }

    /// A message from the networked broker's channel for `room_name`: delivered to the local
    /// members in `seq` order, after a snapshot when a gap or a new epoch shows up.
    pub fn deliver_remote(self: &Arc<Self>, room_name: &str, epoch: &str, seq: u64, json: &[u8]) {
        let Some(room) = self.rooms.get(room_name).map(|r| r.clone()) else {
            return; // not followed here (any more)
        };
        let mut st = room.lock();
        let mut follow = None;
        match &mut st.mirror {
            Mirror::Local | Mirror::Unfollowed => return,
            Mirror::Pending(buffer) => {
                if buffer.len() < REMOTE_BUFFER_MAX {
                    buffer.push((epoch.into(), seq, Bytes::copy_from_slice(json)));
                }
                return;
            }
            Mirror::Synced => {}
        }
        if &*st.epoch == epoch && seq < st.next_seq {
            return; // already delivered (a snapshot brought it, or the channel repeated it)
        }
        if &*st.epoch != epoch || seq > st.next_seq || st.queue.len() >= REMOTE_QUEUE_MAX {
            // Something was missed (or the room restarted in Redis): read it again first.
            self.metrics.remote_gaps.increment(1);
            st.mirror = Mirror::Pending(vec![(epoch.into(), seq, Bytes::copy_from_slice(json))]);
            st.generation += 1;
            follow = Some(st.generation);
        } else {
            self.accept_remote(&room, &mut st, seq, json);
        }
        drop(st);
        if let (Some(generation), Some(f)) = (follow, self.follower()) {
            f.follow(&room, generation);
        }
        self.settle(&room);
    }

    /// The next message (`seq == next_seq`) of a mirrored room: kept and queued for the members.
    fn accept_remote(&self, room: &Arc<Room>, st: &mut RoomState, seq: u64, json: &[u8]) {
        let event = protocol::message_event_from_json(json);
        let entry = HistoryEntry::new(
            seq,
            uuid::Uuid::nil(),
            0,
            None,
            event.inner.clone(),
            event.frame.len(),
        );
        self.remember(room, st, entry);
        st.next_seq = seq + 1;
        let recipients = st.enqueue_unchecked(event);
        self.metrics.publish_recipients.record(recipients as f64);
    }

    /// The snapshot a follow request asked for: mirror it, deliver what the members here missed
    /// and what arrived on the channel meanwhile, then greet the waiting joiners.
    pub fn apply_snapshot(self: &Arc<Self>, room: &Arc<Room>, generation: u64, snap: RoomSnapshot) {
        let mut st = room.lock();
        if st.generation != generation || !matches!(st.mirror, Mirror::Pending(_)) {
            return; // a newer request is in flight, or the room was let go
        }
        let Mirror::Pending(mut buffer) = std::mem::replace(&mut st.mirror, Mirror::Synced) else {
            unreachable!("checked above");
        };
        let had_members = st.has_members();
        let same_epoch = &*st.epoch == snap.epoch.as_str();
        if had_members && same_epoch {
            // A gap or a reconnect: deliver what the members here have not had.
            for (seq, json) in &snap.history {
                if *seq == st.next_seq {
                    self.accept_remote(room, &mut st, *seq, json);
                }
            }
            if st.next_seq <= snap.seq {
                // Older than what Redis still holds: lost for these members. They are told
                // the way a resume would be, with a history event that is not complete.
                self.metrics.remote_gaps.increment(1);
                st.next_seq = snap.seq + 1;
                self.tell_members_incomplete(room, &mut st);
            }
        } else {
            // First follow (or the room's keys were lost in Redis: a new epoch): the mirror
            // is replaced whole.
            self.drop_history(room, &mut st);
            st.epoch = snap.epoch.as_str().into();
            for (seq, json) in &snap.history {
                let event = protocol::message_event_from_json(json);
                let entry = HistoryEntry::new(
                    *seq,
                    uuid::Uuid::nil(),
                    0,
                    None,
                    event.inner,
                    event.frame.len(),
                );
                self.remember(room, &mut st, entry);
            }
            st.next_seq = snap.seq + 1;
            if had_members {
                self.tell_members_incomplete(room, &mut st);
            }
        }
        buffer.sort_by_key(|(_, seq, _)| *seq);
        let mut gap = false;
        for (epoch, seq, json) in &buffer {
            if *epoch != st.epoch || *seq < st.next_seq {
                continue;
            }
            if *seq > st.next_seq {
                gap = true;
                break;
            }
            self.accept_remote(room, &mut st, *seq, json);
        }
        for w in std::mem::take(&mut st.waiting) {
            self.admit(room, &mut st, &w);
        }
        let mut follow = None;
        if gap {
            st.mirror = Mirror::Pending(Vec::new());
            st.generation += 1;
            follow = Some(st.generation);
        }
        drop(st);
        if let (Some(generation), Some(f)) = (follow, self.follower()) {
            f.follow(room, generation);
        }
        self.settle(room);
    }

    /// The room's members get a fresh history event (epoch, everything held, complete:false):
    /// messages were lost between what they have and what the room holds now.
    fn tell_members_incomplete(&self, room: &Arc<Room>, st: &mut RoomState) {
        let to = st.transient_snapshot();
        let held = st.history.iter().map(|e| &e.json);
        if !st.members.is_empty() {
            let frame = protocol::history_event(&room.name, &st.epoch, false, held.clone());
            st.queue.push_back(Queued {
                frame,
                to: Recipients::Members(to),
            });
        }
        // Second-dialect members that asked for history are told the same way; the others
        // never asked for history events and get none.
        let told: Box<[Arc<Outbox>]> = st
            .chat_members
            .values()
            .filter(|(_, _, told)| *told)
            .map(|(o, _, _)| o.clone())
            .collect();
        if !told.is_empty() {
            let frame = protocol::auth::history_event(&room.name, &st.epoch, false, held);
            st.queue.push_back(Queued {
                frame,
                to: Recipients::List(told),
            });
        }
    }

    /// A follow request could not be served (Redis did not answer): try again shortly, as long
    /// as the room still has local members or joiners.
    pub fn snapshot_failed(self: &Arc<Self>, room: &Arc<Room>, generation: u64) {
        let still = {
            let st = room.lock();
            st.generation == generation
                && matches!(st.mirror, Mirror::Pending(_))
                && st.wants_following()
        };
        if !still {
            return;
        }
        let (hub, room) = (Arc::downgrade(self), room.clone());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                tokio::time::sleep(SYNC_RETRY).await;
                let Some(hub) = hub.upgrade() else { return };
                let retry = {
                    let st = room.lock();
                    st.generation == generation && matches!(st.mirror, Mirror::Pending(_))
                };
                if let (true, Some(f)) = (retry, hub.follower()) {
                    f.follow(&room, generation);
                }
            });
        }
    }

    /// Every room with local members or joiners, each marked for a fresh snapshot: after the
    /// networked broker (re)connects, it subscribes to and reads each of them.
    pub fn rooms_to_follow(&self) -> Vec<(Arc<Room>, u64)> {
        let rooms: Vec<Arc<Room>> = self.rooms.iter().map(|r| r.value().clone()).collect();
        rooms
            .into_iter()
            .filter_map(|room| {
                let mut st = room.lock();
                if !st.wants_following() || matches!(st.mirror, Mirror::Local) {
                    return None;
                }
                if !matches!(st.mirror, Mirror::Pending(_)) {
                    st.mirror = Mirror::Pending(Vec::new());
                }
                st.generation += 1;
                let generation = st.generation;
                drop(st);
                Some((room, generation))
            })
            .collect()
    }

    /// A presence event from the networked broker's channel: to this node's members.
    pub fn deliver_remote_presence<N: AsRef<str>>(
        self: &Arc<Self>,
        room_name: &str,
        online: u64,
        message: &str,
        joined: &[N],
        left: &[N],
    ) {
        let Some(room) = self.rooms.get(room_name).map(|r| r.clone()) else {
            return;
        };
        {
            let mut st = room.lock();
            if !matches!(st.mirror, Mirror::Synced) || st.members.is_empty() {
                return; // presence events go to first-dialect members only
            }
            if st.queue.len() >= REMOTE_QUEUE_MAX {
                return; // the next presence event carries the count again
            }
            let frame = protocol::presence_event(message, online as usize, joined, left);
            let to = Recipients::Members(st.transient_snapshot());
            st.queue.push_back(Queued { frame, to });
        }
        self.settle(&room);
    }

    /// Followed rooms and this node's member count in each (the broker refreshes them so a
    /// node that dies drops out of every room's count).
    pub fn followed_member_counts(&self) -> Vec<(Arc<Room>, usize)> {
        let rooms: Vec<Arc<Room>> = self.rooms.iter().map(|r| r.value().clone()).collect();
        rooms
            .into_iter()
            .filter_map(|room| {
                let count = {
                    let st = room.lock();
                    (matches!(st.mirror, Mirror::Synced) && st.has_members())
                        .then_some(st.member_count())
                };
                count.map(|c| (room, c))
            })
            .collect()
    }

    /// A room's members on this node: how many, and their names (at most `max_names`).
    pub fn local_presence(&self, room_name: &str, max_names: usize) -> (usize, Vec<Arc<str>>) {
        let Some(room) = self.rooms.get(room_name).map(|r| r.clone()) else {
            return (0, Vec::new());
        };
        let st = room.lock();
        let names = st
            .members
            .values()
            .map(|(_, s)| s)
            .chain(st.chat_members.values().map(|(_, s, _)| s))
            .take(max_names)
            .map(|s| s.name.clone())
            .collect();
        (st.member_count(), names)
    }

    /// Close every connection on this node whose name is `name` (in `room` only, when given)
    /// with `code`. Returns how many connections were told to close.
    pub fn disconnect(&self, name: &str, room: Option<&str>, code: u16) -> usize {
        let rooms: Vec<Arc<Room>> = match room {
            Some(r) => self.rooms.get(r).map(|r| r.clone()).into_iter().collect(),
            None => self.rooms.iter().map(|r| r.value().clone()).collect(),
        };
        let mut outboxes: Vec<Arc<Outbox>> = Vec::new();
        for room in rooms {
            let st = room.lock();
            let first = st.members.values().map(|(o, s)| (o, s));
            let second = st.chat_members.values().map(|(o, s, _)| (o, s));
            for (outbox, sender) in first.chain(second) {
                if &*sender.name == name {
                    outboxes.push(outbox.clone());
                }
            }
        }
        // A second-dialect connection is in several rooms: close it once.
        outboxes.sort_by_key(|o| Arc::as_ptr(o) as usize);
        outboxes.dedup_by(|a, b| Arc::ptr_eq(a, b));
        for outbox in &outboxes {
            outbox.close(code);
        }
        outboxes.len()
    }

    /// Rooms with members on this node, by name, after `after`, at most `limit`: (name, members).
    pub fn rooms_page(&self, after: Option<&str>, limit: usize) -> Vec<(Arc<str>, usize)> {
        let mut rooms: Vec<(Arc<str>, usize)> = self
            .rooms
            .iter()
            .filter(|r| after.is_none_or(|a| &**r.key() > a))
            .filter_map(|r| {
                let count = r.value().lock().member_count();
                (count > 0).then(|| (r.key().clone(), count))
            })
            .collect();
        rooms.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        rooms.truncate(limit);
        rooms
    }

    /// The messages of a room after `since` held on this node: (epoch, complete, inner message
    /// objects). `complete` is false when messages after `since` are no longer held. `None`
    /// when the room is not known here.
    pub fn history_after(&self, room_name: &str, since: u64) -> Option<(String, bool, Vec<Bytes>)> {
        let room = self.rooms.get(room_name).map(|r| r.clone())?;
        let st = room.lock();
        let resume = Resume {
            since,
            epoch: Some(st.epoch.to_string()),
        };
        let (skip, complete) = st.history_for(Some(&resume));
        let messages = if complete {
            st.history
                .iter()
                .skip(skip)
                .map(|e| e.json.clone())
                .collect()
        } else {
            st.history.iter().map(|e| e.json.clone()).collect()
        };
        Some((st.epoch.to_string(), complete, messages))
    }

    /// Whether the room still has local members or joiners (a release may unsubscribe).
    pub fn wants_following(&self, room: &Room) -> bool {
        room.lock().wants_following()
    }

    /// Keep `entry` in the room's history (evicting the oldest past `HISTORY_LIMIT`) and note
    /// the publish for the history budget. Under the room lock; the budget itself is enforced
    /// by [`Hub::settle`], after the lock is released.
    pub fn remember(&self, room: &Arc<Room>, st: &mut RoomState, entry: HistoryEntry) {
        st.last_publish = self.tick();
        let limit = self.settings.history_limit;
        if limit == 0 || st.evicted {
            return;
        }
        let mut freed = 0;
        while st.history.len() >= limit {
            match st.history.pop_front() {
                Some(old) => freed += old.charge,
                None => break,
            }
        }
        let added = entry.charge;
        st.history.push_back(entry);
        st.history_bytes = st.history_bytes + added - freed;
        if added >= freed {
            self.history_bytes
                .fetch_add(added - freed, Ordering::Relaxed);
        } else {
            self.history_bytes
                .fetch_sub(freed - added, Ordering::Relaxed);
        }
        if st.history_listed.is_none() {
            let stamp = st.last_publish;
            lock(&self.history_rooms).insert((stamp, room.id), Arc::downgrade(room));
            st.history_listed = Some(stamp);
        }
    }

    /// After the room lock is released: deliver what is queued (unless someone already is),
    /// then hold the history budget. Every path that queues a frame calls this.
    pub fn settle(self: &Arc<Self>, room: &Arc<Room>) {
        let claimed = {
            let mut st = room.lock();
            let claim = !st.delivering && !st.queue.is_empty();
            if claim {
                st.delivering = true;
            }
            claim
        };
        if claimed {
            self.deliver_queue(room);
        }
        if self.history_bytes.load(Ordering::Relaxed) > self.settings.history_max_bytes {
            self.enforce_history_budget();
        }
    }

    /// Deliver the room's queue in order until it is empty. The caller owns delivery (it set
    /// `delivering`); ownership ends when the queue is found empty, or passes to a task.
    fn deliver_queue(self: &Arc<Self>, room: &Arc<Room>) {
        let mut pushes = 0;
        while let Some(next) = next_queued(room) {
            if pushes >= DRAIN_PUSHES {
                // This caller is some connection's task: hand the rest of the room's traffic to
                // a task of its own rather than keep that connection from its own socket.
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let (hub, room) = (self.clone(), room.clone());
                    runtime.spawn(async move {
                        hub.deliver(&room, &next);
                        drop(next);
                        hub.deliver_queue(&room);
                    });
                    return;
                }
                pushes = 0;
            }
            pushes += self.deliver(room, &next);
        }
    }

    /// Send a frame to one connection of the room (an ack, an error event) behind every frame
    /// still waiting for delivery in the room, so a connection's answers arrive in the order of
    /// the frames they answer: an ack never overtakes its message, an error never overtakes the
    /// ack of an earlier message. Pushed at once when nothing is queued or being delivered.
    ///
    /// Answers are queued past [`DELIVERY_QUEUE_MAX`] (publishes are refused there, answers are
    /// not), up to twice it; past that a rare answer is pushed at once, out of order rather
    /// than grow the queue.
    pub fn send_in_order(self: &Arc<Self>, room: &Arc<Room>, outbox: &Arc<Outbox>, frame: Bytes) {
        {
            let mut st = room.lock();
            let busy = st.delivering || !st.queue.is_empty();
            if busy && st.queue.len() < 2 * DELIVERY_QUEUE_MAX {
                st.queue.push_back(Queued {
                    frame,
                    to: Recipients::One(outbox.clone()),
                });
                drop(st);
                self.settle(room);
                return;
            }
        }
        self.deliver(
            room,
            &Queued {
                frame,
                to: Recipients::One(outbox.clone()),
            },
        );
    }

    /// Push one shared frame to all its recipients. Counted once per call, not once per
    /// recipient. Returns the work done, in pushes (a direct write counts `DIRECT_WRITE_COST`).
    fn deliver(&self, room: &Arc<Room>, queued: &Queued) -> usize {
        let frame = &queued.frame;
        let (recipients, pushed) = match &queued.to {
            Recipients::Message(members, inner) => {
                let wake = self.flush_window(room, members);
                let mut pushed = self.push_all(frame, members.query(), wake);
                if !members.auth().is_empty() {
                    // Built once per message, for every second-dialect member.
                    if let Some(chat) = protocol::auth::chat_event(inner) {
                        let more = self.push_all(&chat, members.auth(), wake);
                        pushed.delivered += more.delivered;
                        pushed.written += more.written;
                    }
                }
                // Members whose outbox took it (not those closing).
                self.metrics
                    .publish_recipients
                    .record(pushed.delivered as f64);
                (members.all.len(), pushed)
            }
            Recipients::Members(members) => {
                (members.query, self.push_all(frame, members.query(), true))
            }
            Recipients::List(to) => (to.len(), self.push_all(frame, to, true)),
            Recipients::One(outbox) => {
                (1, self.push_all(frame, std::slice::from_ref(outbox), true))
            }
        };
        recipients + pushed.written * (DIRECT_WRITE_COST - 1)
    }

    /// Whether a message to `members` wakes them now (see [`FlushWindow`]). False when the room's
    /// window is open: the message is held back with it, and its recipients are woken when the
    /// window ends. Opening a window starts the one timer task that ends it (and the windows
    /// after it, while they keep holding messages back).
    fn flush_window(&self, room: &Arc<Room>, members: &Snapshot) -> bool {
        let delay = self.settings.flush_delay;
        if delay.is_zero() || members.all.len() < self.settings.flush_min_members {
            return true;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return true;
        };
        let mut window = lock(&room.flush);
        if window.open {
            window.wake = Some(members.clone());
            return false;
        }
        window.open = true;
        drop(window);
        let room = room.clone();
        runtime.spawn(async move {
            // Bounded: each round ends a window that held a message back; the room's traffic
            // stops, or the room is dropped with its last member, and the loop ends.
            loop {
                tokio::time::sleep(delay).await;
                let wake = {
                    let mut window = lock(&room.flush);
                    match window.wake.take() {
                        Some(members) => members,
                        None => {
                            window.open = false;
                            return;
                        }
                    }
                };
                for outbox in wake.all.iter() {
                    outbox.nudge();
                }
            }
        });
        true
    }

    /// Push one shared frame to every outbox in `to`, counted once per call, not once per
    /// recipient.
    /// `wake`: false when a flush window wakes them later.
    ///
    /// An idle member's frame is written to its socket here (`Outbox::push_or_write`); such a
    /// write counts as a socket write that waited nothing for the publish-to-write histogram.
    fn push_all(&self, frame: &Bytes, to: &[Arc<Outbox>], wake: bool) -> PushedAll {
        let max = self.settings.outbox_max_bytes;
        let mut delivered = 0u64;
        let mut written = 0usize;
        let mut slow = 0u64;
        for (i, outbox) in to.iter().enumerate() {
            if let Some(next) = to.get(i + 1) {
                // Each `send` takes microseconds: time enough for the next outbox to arrive.
                next.prefetch();
            }
            let pushed = if wake {
                outbox.push_or_write(frame, max)
            } else {
                outbox.push_quietly(frame, max)
            };
            match pushed {
                Pushed::Queued => delivered += 1,
                Pushed::Written => written += 1,
                Pushed::SlowConsumer => slow += 1,
                Pushed::Closed => {}
            }
        }
        if written > 0 {
            delivered += written as u64;
            self.metrics.socket_writes.increment(written as u64);
            self.metrics
                .publish_to_write_seconds
                .record_many(0.0, written);
        }
        self.metrics.frames_delivered.increment(delivered);
        self.metrics
            .bytes_sent
            .increment(delivered * frame.len() as u64);
        if slow > 0 {
            self.metrics.slow_consumer_closes.increment(slow);
        }
        PushedAll {
            delivered: delivered as usize,
            written,
        }
    }

    /// Drop the history of the rooms that published least recently until the process-wide
    /// count is within `HISTORY_MAX_BYTES` (see the module docs for why the first entry of the
    /// index, once confirmed, is the least recently published room).
    fn enforce_history_budget(&self) {
        while self.history_bytes.load(Ordering::Relaxed) > self.settings.history_max_bytes {
            let first = lock(&self.history_rooms)
                .first_key_value()
                .map(|(key, room)| (*key, room.clone()));
            let Some((key, weak)) = first else { return };
            let Some(room) = weak.upgrade() else {
                lock(&self.history_rooms).remove(&key);
                continue;
            };
            let mut st = room.lock();
            if st.history_listed != Some(key.0) {
                // The entry changed while we looked; this key is not the room's any more.
                lock(&self.history_rooms).remove(&key);
                continue;
            }
            if st.last_publish != key.0 {
                let mut index = lock(&self.history_rooms);
                index.remove(&key);
                index.insert((st.last_publish, room.id), weak);
                st.history_listed = Some(st.last_publish);
                continue;
            }
            self.drop_history(&room, &mut st);
        }
    }

    /// Record a join or leave and send presence now (leading edge) or schedule one coalesced
    /// event per room at most every `presence_interval` — so a join storm of N costs O(N) frames.
    /// Under the room lock; the caller settles the room afterwards.
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
        match p.last_sent {
            Some(t) if Instant::now() < t + interval => {
                self.schedule_presence(room, st, t + interval)
            }
            _ => self.flush_presence(room, st),
        }
    }

    /// Flush presence at `at` from a timer task. Without a runtime (it is shutting down) the
    /// pending names wait for the next join or leave.
    fn schedule_presence(self: &Arc<Self>, room: &Arc<Room>, st: &mut RoomState, at: Instant) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        st.presence.flush_scheduled = true;
        let (hub, room) = (self.clone(), room.clone());
        runtime.spawn(async move {
            tokio::time::sleep_until(at).await;
            {
                let mut st = room.lock();
                st.presence.flush_scheduled = false;
                hub.flush_presence(&room, &mut st);
            }
            hub.settle(&room);
        });
    }

    /// Queue one presence event with everything noted since the last one.
    fn flush_presence(self: &Arc<Self>, room: &Arc<Room>, st: &mut RoomState) {
        if st.delivery_full() {
            let retry = self.settings.presence_interval.max(PRESENCE_RETRY_MIN);
            self.schedule_presence(room, st, Instant::now() + retry);
            return;
        }
        let p = std::mem::take(&mut st.presence);
        st.presence.last_sent = Some(Instant::now());
        if p.joined_count + p.left_count == 0 {
            return;
        }
        if !matches!(st.mirror, Mirror::Local) {
            // Several nodes: the count is the room's across nodes, so the broker makes the event
            // (and it comes back to this node's members through the channel).
            if let Some(f) = self.follower() {
                let message = presence_message(&p);
                f.presence(room, st.member_count(), message, &p.joined, &p.left);
            }
            return;
        }
        if st.members.is_empty() {
            return;
        }
        let message = presence_message(&p);
        let frame = protocol::presence_event(&message, st.member_count(), &p.joined, &p.left);
        let to = Recipients::Members(st.transient_snapshot());
        st.queue.push_back(Queued { frame, to });
    }
}

/// Pop the next frame to deliver; when there is none, delivery ends (under the same lock, so a
/// publisher that enqueues afterwards finds nobody delivering and claims it).
fn next_queued(room: &Room) -> Option<Queued> {
    let mut st = room.lock();
    let next = st.queue.pop_front();
    if next.is_none() {
        st.delivering = false;
        // A drained queue gives its buffer back (384 B): over six nodes and 1,000 rooms the
        // buffers an idle relay kept were ~23 B per connection. A busy room pays one allocation
        // per delivery round, beside the frame's own.
        st.queue = VecDeque::new();
    }
    next
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
        let mut st = self.room.lock();
        st.reserved -= 1;
        if let Some(hub) = self.room.hub.upgrade() {
            hub.sync_empty_listing(&self.room, &mut st);
        }
    }
}

impl std::fmt::Debug for RoomReservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomReservation")
            .field("room", &self.room.name)
            .finish()
    }
}

/// A connection's place in a room. Dropping it leaves the room (so a connection task that
/// panics still leaves); [`Membership::leave`] leaves earlier, and leaving twice is harmless.
pub struct Membership {
    room: Arc<Room>,
    client_id: u64,
    sender: Arc<Sender>,
}

impl Membership {
    pub fn room(&self) -> &Arc<Room> {
        &self.room
    }

    pub fn client_id(&self) -> u64 {
        self.client_id
    }

    pub fn sender(&self) -> &Arc<Sender> {
        &self.sender
    }

    /// Leave the room now: no frame queued from here on includes this connection, and the room
    /// hears about it through presence. Idempotent.
    pub fn leave(&self) {
        let hub = self.room.hub.upgrade();
        let mut unfollow = false;
        {
            let mut st = self.room.lock();
            if let Some(at) = st
                .waiting
                .iter()
                .position(|w| w.client_id == self.client_id)
            {
                // Still waiting for the room's snapshot: never greeted, never announced.
                st.waiting.swap_remove(at);
            } else if st.members.remove(&self.client_id).is_some()
                || st.chat_members.remove(&self.client_id).is_some()
            {
                st.snapshot = None;
                if let Some(hub) = &hub {
                    hub.note_presence(&self.room, &mut st, None, Some(self.sender.name.clone()));
                }
            } else {
                return;
            }
            if !st.wants_following() && !matches!(st.mirror, Mirror::Local | Mirror::Unfollowed) {
                // The last local member left: stop following; the next join reads it afresh.
                st.mirror = Mirror::Unfollowed;
                st.generation += 1;
                unfollow = true;
            }
            let Some(hub) = &hub else { return };
            hub.sync_empty_listing(&self.room, &mut st);
        }
        if let Some(hub) = hub {
            if unfollow {
                if let Some(f) = hub.follower() {
                    f.unfollow(&self.room);
                }
            }
            hub.settle(&self.room);
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.leave();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::broker::{MemoryBroker, PublishError};
    use crate::protocol::ClientMessage;

    pub(crate) fn settings(max_rooms: usize) -> HubSettings {
        HubSettings {
            history_limit: 3,
            history_max_bytes: usize::MAX,
            max_rooms,
            outbox_max_bytes: 1 << 20,
            presence_interval: Duration::from_millis(100),
            flush_delay: Duration::ZERO,
            flush_min_members: usize::MAX,
        }
    }

    fn hub(max_rooms: usize) -> Arc<Hub> {
        Arc::new(Hub::new(settings(max_rooms), Metrics::new()))
    }

    pub(crate) fn sender(name: &str, session: u128) -> Arc<Sender> {
        Arc::new(Sender {
            name: name.into(),
            session,
        })
    }

    pub(crate) fn message(text: &str, request_id: Option<&str>) -> ClientMessage<'static> {
        ClientMessage {
            text: text.to_string().into(),
            request_id: request_id.map(|r| r.to_string().into()),
        }
    }

    /// The JSON of every frame queued to `outbox` since the last call.
    pub(crate) fn events(outbox: &Outbox) -> Vec<serde_json::Value> {
        let batch = outbox.take();
        outbox.written(
            batch.frames.iter().map(|f| f.len()).sum(),
            batch.frames.len(),
        );
        batch
            .frames
            .iter()
            .map(|f| {
                let payload = match f[1] {
                    126 => &f[4..],
                    127 => &f[10..],
                    _ => &f[2..],
                };
                serde_json::from_slice(payload).unwrap()
            })
            .collect()
    }

    /// The seqs a member saw, history first, then live messages.
    fn seqs_seen(outbox: &Outbox) -> Vec<u64> {
        let mut seqs = Vec::new();
        for e in events(outbox) {
            match e["type"].as_str() {
                Some("history") => seqs.extend(
                    e["messages"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|m| m["seq"].as_u64().unwrap()),
                ),
                Some("message") => seqs.push(e["message"]["seq"].as_u64().unwrap()),
                _ => {}
            }
        }
        seqs
    }

    fn member(hub: &Arc<Hub>, room: &str, name: &str) -> (Arc<Outbox>, Membership) {
        let outbox = Arc::new(Outbox::default());
        let m = hub.join(
            hub.reserve(room).unwrap(),
            &outbox,
            sender(name, uuid::Uuid::new_v4().as_u128()),
            None,
            Greeting::Query,
        );
        (outbox, m)
    }

    fn entry(seq: u64) -> HistoryEntry {
        HistoryEntry::new(
            seq,
            uuid::Uuid::nil(),
            1,
            None,
            Bytes::from(format!("{{\"seq\":{seq}}}")),
            0,
        )
    }

    #[test]
    fn resume_gives_the_exact_tail_or_says_incomplete() {
        let hub = hub(10);
        let room = hub.room("r").unwrap();
        let mut st = room.lock();
        for _ in 1..=5 {
            let seq = st.take_seq();
            hub.remember(&room, &mut st, entry(seq));
        }
        let epoch = Some(st.epoch().to_string());
        let at = |since: u64, epoch: &Option<String>| {
            st.history_for(Some(&Resume {
                since,
                epoch: epoch.clone(),
            }))
        };
        assert_eq!(st.history_for(None), (0, true));
        assert_eq!(at(4, &epoch), (2, true));
        assert_eq!(at(2, &epoch), (0, true));
        assert_eq!(at(5, &epoch), (3, true));
        assert_eq!(at(1, &epoch), (0, false), "seq 2 was evicted");
        assert_eq!(at(9, &epoch), (0, false), "seq from the future");
        assert_eq!(at(4, &Some("other".into())), (0, false));
    }

    #[tokio::test]
    async fn full_room_map_evicts_an_empty_room_but_never_an_occupied_one() {
        let hub = hub(2);
        let (outbox, _m) = member(&hub, "busy", "n");
        let quiet = hub.room("quiet").unwrap();
        assert!(hub.room("third").is_ok(), "the empty room made space");
        assert!(quiet.lock().evicted);
        let _m2 = hub.join(
            hub.reserve("third").unwrap(),
            &outbox,
            sender("n", 1),
            None,
            Greeting::Query,
        );
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
        let _m = hub.join(held, &outbox, sender("n", 1), None, Greeting::Query);
        assert_eq!(hub.room_count(), 1);
    }

    #[tokio::test]
    async fn eviction_takes_the_room_that_has_been_empty_longest() {
        let hub = hub(3);
        let (_, a) = member(&hub, "a", "n");
        let (_, b) = member(&hub, "b", "n");
        let (_, c) = member(&hub, "c", "n");
        let rooms: Vec<_> = ["a", "b", "c"].map(|r| hub.room(r).unwrap()).into();
        // Emptied in the order c, a, b: c has been idle longest whatever the map order is.
        drop(c);
        drop(a);
        drop(b);
        hub.room("d").unwrap();
        assert!(rooms[2].lock().evicted, "c was empty longest");
        assert!(!rooms[0].lock().evicted && !rooms[1].lock().evicted);
        hub.room("e").unwrap();
        assert!(rooms[0].lock().evicted, "then a");
        assert!(!rooms[1].lock().evicted);
        // A room that gets a member leaves the empty index: b is safe now, d (empty) goes.
        let (_, _b_again) = member(&hub, "b", "n");
        hub.room("f").unwrap();
        assert!(!rooms[1].lock().evicted);
        assert_eq!(hub.room_count(), 3);
        assert!(hub.rooms.get("d").is_none(), "d was the empty one left");
        assert_eq!(
            lock(&hub.empty_rooms).len(),
            2,
            "e and f are empty, b is not"
        );
    }

    #[tokio::test]
    async fn dropping_a_membership_leaves_the_room_once() {
        let hub = Arc::new(Hub::new(
            HubSettings {
                presence_interval: Duration::ZERO,
                ..settings(10)
            },
            Metrics::new(),
        ));
        let (watcher, _w) = member(&hub, "r", "watcher");
        let (_, m) = member(&hub, "r", "leaver");
        let room = m.room().clone();
        assert_eq!(room.lock().member_count(), 2);
        events(&watcher);
        m.leave();
        m.leave();
        drop(m);
        assert_eq!(room.lock().member_count(), 1);
        let left: Vec<_> = events(&watcher)
            .into_iter()
            .filter(|e| e["type"] == "presence")
            .collect();
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0]["left"], serde_json::json!(["leaver"]));

        // A task that panics while holding its membership still leaves.
        let (_, m) = member(&hub, "r", "panicky");
        let task = tokio::spawn(async move {
            let _m = m;
            panic!("connection task bug");
        });
        assert!(task.await.is_err());
        assert_eq!(room.lock().member_count(), 1);
    }

    #[tokio::test]
    async fn a_busy_large_room_wakes_its_members_once_per_flush_window() {
        use std::task::Context;
        let hub = Arc::new(Hub::new(
            HubSettings {
                presence_interval: Duration::ZERO,
                flush_delay: Duration::from_millis(150),
                flush_min_members: 3,
                ..settings(10)
            },
            Metrics::new(),
        ));
        let broker = MemoryBroker::new(hub.clone());
        let members: Vec<_> = (0..3)
            .map(|i| member(&hub, "r", &format!("m{i}")))
            .collect();
        let room = members[0].1.room().clone();
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        // Whether each member's task has been woken since it last looked; then it looks.
        let mut woken = || -> Vec<bool> {
            members
                .iter()
                .map(|(o, _)| {
                    let ready = o.poll_work(&mut cx).is_ready();
                    o.take();
                    ready
                })
                .collect()
        };
        let say = |text: &str| {
            broker
                .publish_now(&room, &sender("a", 1), &message(text, None))
                .unwrap();
        };
        woken();
        say("first");
        assert_eq!(
            woken(),
            [true; 3],
            "a quiet room's message goes out at once"
        );
        say("second");
        say("third");
        assert_eq!(woken(), [false; 3], "held back while the window is open");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(woken(), [true; 3], "woken once when the window ends");
        // The next window held nothing back: it closed, and the room is quiet again.
        tokio::time::sleep(Duration::from_millis(300)).await;
        say("fourth");
        assert_eq!(woken(), [true; 3], "after a quiet window, at once again");
        // An ordinary push to a member holding frames back wakes it (its own ack, say).
        say("fifth");
        assert_eq!(woken(), [false; 3]);
        say("sixth");
        members[0].0.push(&Bytes::from_static(b"ack"), 1 << 20);
        assert!(members[0].0.poll_work(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn member_storage_shrinks_when_occupancy_falls() {
        let hub = hub(10);
        let broker = MemoryBroker::new(hub.clone());
        let members: Vec<_> = (0..1000).map(|_| member(&hub, "r", "n")).collect();
        let room = members[0].1.room().clone();
        broker
            .publish_now(&room, &sender("a", 1), &message("hi", None))
            .unwrap();
        {
            let st = room.lock();
            assert!(st.snapshot.is_some());
            // The snapshot lists members in join order, i.e. in the order their outboxes were
            // allocated (sequential memory during fan-out).
            let ids: Vec<u64> = st.members.keys().copied().collect();
            assert!(ids.windows(2).all(|w| w[0] < w[1]));
        }
        let outboxes: Vec<_> = members.iter().map(|(o, _)| o.clone()).collect();
        drop(members);
        let st = room.lock();
        assert_eq!(st.member_count(), 0);
        assert!(st.members.is_empty() && st.snapshot.is_none());
        assert!(st.queue.is_empty() && !st.delivering);
        drop(st);
        // Nothing in the room holds a member's outbox any more: map, snapshot and queue let go.
        assert!(outboxes.iter().all(|o| Arc::strong_count(o) == 1));
    }

    /// Three members of room "r"; the first has heard of the others' joins (presence goes to
    /// every member, through the room's queue).
    fn three_announced(hub: &Arc<Hub>) -> (Vec<(Arc<Outbox>, Membership)>, Arc<Room>) {
        let members: Vec<_> = (0..3).map(|_| member(hub, "r", "n")).collect();
        let room = members[0].1.room().clone();
        assert!(events(&members[0].0)
            .iter()
            .any(|e| e["type"] == "presence"));
        (members, room)
    }

    #[tokio::test]
    async fn only_a_room_that_publishes_keeps_a_member_snapshot() {
        let hub = hub(10);
        let broker = MemoryBroker::new(hub.clone());
        // The joins were announced without keeping a snapshot.
        let (_members, room) = three_announced(&hub);
        assert!(room.lock().snapshot.is_none());
        broker
            .publish_now(&room, &sender("a", 1), &message("hi", None))
            .unwrap();
        assert!(room.lock().snapshot.is_some());
    }

    #[tokio::test]
    async fn a_room_with_nothing_to_deliver_keeps_no_queue_buffer() {
        let hub = hub(10);
        let broker = MemoryBroker::new(hub.clone());
        // The joins' presence events went through the queue, and so does a message.
        let (members, room) = three_announced(&hub);
        assert_eq!(room.lock().queue.capacity(), 0);
        let _ = events(&members[1].0);
        broker
            .publish_now(&room, &sender("a", 1), &message("hi", None))
            .unwrap();
        assert_eq!(events(&members[1].0)[0]["type"], "message");
        let st = room.lock();
        assert!(!st.delivering);
        assert_eq!(
            st.queue.capacity(),
            0,
            "a drained queue gives its buffer back"
        );
    }

    #[tokio::test]
    async fn each_message_is_encoded_once_per_dialect_never_per_recipient() {
        let hub = hub(10);
        let broker = MemoryBroker::new(hub.clone());
        let room = hub.room("r").unwrap();
        let join = |greeting| {
            let outbox = Arc::new(Outbox::default());
            let m = hub.join(
                hub.reserve("r").unwrap(),
                &outbox,
                sender("n", 1),
                None,
                greeting,
            );
            outbox.take(); // the greeting (and history)
            (outbox, m)
        };
        let query: Vec<_> = (0..3).map(|_| join(Greeting::Query)).collect();
        let auth: Vec<_> = (0..3)
            .map(|_| join(Greeting::Auth { history: false }))
            .collect();
        for (o, _) in query.iter().chain(&auth) {
            o.take(); // presence events (first dialect only)
        }
        broker
            .publish_now(&room, &sender("ada", 2), &message("hi", Some("r1")))
            .unwrap();
        let frame_of = |o: &Arc<Outbox>| {
            let mut batch = o.take().frames;
            assert_eq!(batch.len(), 1, "one frame per member");
            batch.pop_front().unwrap()
        };
        let first: Vec<Bytes> = query.iter().map(|(o, _)| frame_of(o)).collect();
        let second: Vec<Bytes> = auth.iter().map(|(o, _)| frame_of(o)).collect();
        // Same allocation for every member of a dialect: encoded once, written many times.
        assert!(first.iter().all(|f| f.as_ptr() == first[0].as_ptr()));
        assert!(second.iter().all(|f| f.as_ptr() == second[0].as_ptr()));
        assert_ne!(first[0].as_ptr(), second[0].as_ptr());
        assert!(first[0].windows(9).any(|w| w == b"\"message\""));
        assert!(second[0].windows(6).any(|w| w == b"\"chat\""));
    }

    #[test]
    fn publishers_only_queue_while_someone_else_delivers() {
        let hub = hub(10);
        let broker = MemoryBroker::new(hub.clone());
        let room = hub.room("r").unwrap();
        let outbox = Arc::new(Outbox::default());
        let _m = hub.join(
            hub.reserve("r").unwrap(),
            &outbox,
            sender("n", 1),
            None,
            Greeting::Query,
        );
        events(&outbox);
        // As if another thread were in the middle of delivering this room's queue.
        room.lock().delivering = true;
        let from = sender("ada", 2);
        let p = broker
            .publish_now(&room, &from, &message("hi", None))
            .unwrap();
        assert_eq!(p.seq, 1);
        assert!(events(&outbox).is_empty(), "queued, not delivered");
        assert_eq!(room.lock().queue.len(), 1);
        // Fill the queue to its bound: the next publish is refused and takes no seq.
        for _ in 1..DELIVERY_QUEUE_MAX {
            broker
                .publish_now(&room, &from, &message("more", None))
                .unwrap();
        }
        assert_eq!(
            broker.publish_now(&room, &from, &message("one too many", None)),
            Err(PublishError::Busy)
        );
        assert_eq!(room.lock().next_seq(), DELIVERY_QUEUE_MAX as u64 + 1);
        // The other deliverer is done: the next settle delivers everything, in order.
        room.lock().delivering = false;
        hub.settle(&room);
        let seqs = seqs_seen(&outbox);
        assert_eq!(seqs, (1..=DELIVERY_QUEUE_MAX as u64).collect::<Vec<_>>());
        let st = room.lock();
        assert!(!st.delivering && st.queue.is_empty());
    }

    #[test]
    fn answers_never_overtake_the_messages_they_answer() {
        let hub = hub(10);
        let broker = MemoryBroker::new(hub.clone());
        let room = hub.room("r").unwrap();
        let outbox = Arc::new(Outbox::default());
        let me = sender("n", 1);
        let _m = hub.join(
            hub.reserve("r").unwrap(),
            &outbox,
            me.clone(),
            None,
            Greeting::Query,
        );
        events(&outbox);
        // Nothing queued: an answer goes out at once.
        hub.send_in_order(
            &room,
            &outbox,
            protocol::error_event(protocol::ErrorCode::Empty),
        );
        assert_eq!(events(&outbox)[0]["code"], "empty");
        // Another deliverer is busy: the message waits in the queue, and so does its ack and the
        // error answering the next frame.
        room.lock().delivering = true;
        let p = broker
            .publish_now(&room, &me, &message("hi", Some("r1")))
            .unwrap();
        let ack = protocol::ack_event("r1", &p.id, p.seq, false);
        hub.send_in_order(&room, &outbox, ack);
        hub.send_in_order(
            &room,
            &outbox,
            protocol::error_event(protocol::ErrorCode::Empty),
        );
        assert!(events(&outbox).is_empty());
        room.lock().delivering = false;
        hub.settle(&room);
        let kinds: Vec<_> = events(&outbox)
            .into_iter()
            .map(|e| e["type"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(kinds, ["message", "ack", "error"]);
    }

    /// Many publishers on many threads: every member sees every seq once, in order.
    #[test]
    fn concurrent_publishers_deliver_in_seq_order_to_every_member() {
        let hub = Arc::new(Hub::new(
            HubSettings {
                history_limit: 0,
                outbox_max_bytes: usize::MAX,
                ..settings(10)
            },
            Metrics::new(),
        ));
        let broker = MemoryBroker::new(hub.clone());
        let room = hub.room("r").unwrap();
        let members: Vec<_> = {
            let _rt = tokio::runtime::Runtime::new().unwrap();
            let _g = _rt.enter();
            (0..50).map(|_| member(&hub, "r", "n")).collect()
        };
        for (o, _) in &members {
            events(o);
        }
        let (threads, each) = (4, 300);
        std::thread::scope(|s| {
            for t in 0..threads {
                let (broker, room) = (&broker, &room);
                s.spawn(move || {
                    let from = sender("p", t);
                    for _ in 0..each {
                        loop {
                            match broker.publish_now(room, &from, &message("x", None)) {
                                Ok(_) => break,
                                Err(PublishError::Busy) => std::thread::yield_now(),
                                Err(e) => panic!("{e}"),
                            }
                        }
                    }
                });
            }
        });
        let all: Vec<u64> = (1..=threads as u64 * each).collect();
        for (o, _) in &members {
            assert_eq!(seqs_seen(o), all);
        }
    }

    /// Members join while others publish: each gets every message exactly once — from history
    /// or live — and live ones after its history, in order.
    #[test]
    fn joins_are_exact_under_concurrent_publishing() {
        let hub = Arc::new(Hub::new(
            HubSettings {
                history_limit: 10_000,
                outbox_max_bytes: usize::MAX,
                presence_interval: Duration::ZERO,
                ..settings(10)
            },
            Metrics::new(),
        ));
        let broker = MemoryBroker::new(hub.clone());
        let room = hub.room("r").unwrap();
        let (each, joiners) = (400u64, 60);
        let joined = std::thread::scope(|s| {
            for t in 0..2 {
                let (broker, room) = (&broker, &room);
                s.spawn(move || {
                    let from = sender("p", t);
                    for _ in 0..each {
                        while broker
                            .publish_now(room, &from, &message("x", None))
                            .is_err()
                        {
                            std::thread::yield_now();
                        }
                    }
                });
            }
            let hub = &hub;
            s.spawn(move || {
                (0..joiners)
                    .map(|_| {
                        std::thread::yield_now();
                        member(hub, "r", "late")
                    })
                    .collect::<Vec<_>>()
            })
            .join()
            .unwrap()
        });
        let last = 2 * each;
        for (o, _) in &joined {
            let seqs = seqs_seen(o);
            assert_eq!(
                seqs,
                (1..=last).collect::<Vec<_>>(),
                "a joiner missed or doubled"
            );
        }
    }

    /// A deliverer hands a long queue to a task of its own; order still holds.
    #[tokio::test]
    async fn a_long_queue_is_handed_to_a_task_in_order() {
        let hub = Arc::new(Hub::new(
            HubSettings {
                history_limit: 0,
                outbox_max_bytes: usize::MAX,
                // One presence event for the whole join storm (the next is an hour away).
                presence_interval: Duration::from_secs(3600),
                ..settings(10)
            },
            Metrics::new(),
        ));
        let broker = MemoryBroker::new(hub.clone());
        let room = hub.room("r").unwrap();
        let members: Vec<_> = (0..2000).map(|_| member(&hub, "r", "n")).collect();
        for (o, _) in &members {
            events(o);
        }
        // Queue 30 frames while "someone else" delivers, then let this thread deliver them.
        room.lock().delivering = true;
        let from = sender("p", 1);
        for _ in 0..30 {
            broker
                .publish_now(&room, &from, &message("x", None))
                .unwrap();
        }
        room.lock().delivering = false;
        hub.settle(&room);
        {
            // 2,000 pushes a frame: after DRAIN_PUSHES this caller handed the rest to a task,
            // which cannot have run yet on this single-threaded runtime.
            let st = room.lock();
            assert!(st.delivering, "delivery belongs to the task now");
            assert_eq!(st.queue.len(), 30 - DRAIN_PUSHES.div_ceil(2000) - 1);
        }
        assert_eq!(seqs_seen(&members[0].0), (1..=9).collect::<Vec<_>>());
        while {
            let st = room.lock();
            st.delivering || !st.queue.is_empty()
        } {
            tokio::task::yield_now().await;
        }
        assert_eq!(seqs_seen(&members[0].0), (10..=30).collect::<Vec<_>>());
        for (o, _) in &members[1..] {
            assert_eq!(seqs_seen(o), (1..=30).collect::<Vec<_>>());
        }
    }

    #[test]
    fn history_budget_drops_the_least_recently_published_room_first() {
        let publish = |hub: &Arc<Hub>, room: &str| {
            let broker = MemoryBroker::new(hub.clone());
            let room = hub.room(room).unwrap();
            broker
                .publish_now(&room, &sender("ada", 1), &message("hello", None))
                .unwrap();
            room
        };
        // What one message is charged (same text, name, room-name length and seq width below).
        let probe = hub(10);
        publish(&probe, "r0");
        let one = probe.history_bytes();
        assert!(one > std::mem::size_of::<HistoryEntry>());

        let hub = Arc::new(Hub::new(
            HubSettings {
                history_limit: 10,
                history_max_bytes: 3 * one + one / 2,
                ..settings(10)
            },
            Metrics::new(),
        ));
        let r1 = publish(&hub, "r1");
        let r2 = publish(&hub, "r2");
        let r3 = publish(&hub, "r3");
        assert_eq!(hub.history_bytes(), 3 * one);
        // r1 publishes again: four messages do not fit, and r2 is now the room that published
        // least recently (r1 was listed first, but has published since).
        publish(&hub, "r1");
        assert_eq!(r2.lock().history().count(), 0, "r2's history went");
        assert_eq!(r1.lock().history().count(), 2);
        assert_eq!(r3.lock().history().count(), 1);
        assert_eq!(hub.history_bytes(), 3 * one);
        assert_eq!(
            hub.history_bytes(),
            [&r1, &r2, &r3]
                .iter()
                .map(|r| r.lock().history_bytes())
                .sum::<usize>()
        );
        // r2 keeps its seq and epoch: a resume into it is told the history is incomplete.
        let st = r2.lock();
        assert_eq!(st.next_seq(), 2);
        let resume = Resume {
            since: 0,
            epoch: Some(st.epoch().to_string()),
        };
        assert_eq!(st.history_for(Some(&resume)), (0, false));
        drop(st);
        // Next in line: r3, then r1.
        publish(&hub, "r1");
        assert_eq!(r3.lock().history().count(), 0);
        assert_eq!(r1.lock().history().count(), 3);
    }

    #[tokio::test]
    async fn evicting_a_room_gives_back_its_history_bytes() {
        let hub = hub(1);
        let broker = MemoryBroker::new(hub.clone());
        let room = hub.room("old").unwrap();
        broker
            .publish_now(&room, &sender("a", 1), &message("hi", None))
            .unwrap();
        assert!(hub.history_bytes() > 0);
        hub.room("new").unwrap();
        assert!(room.lock().evicted);
        assert_eq!(hub.history_bytes(), 0);
        assert!(lock(&hub.history_rooms).is_empty());
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
