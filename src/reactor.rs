//! Where open connections wait: one reactor per runtime worker, each an epoll set and a slab of
//! connections driven by a single tokio task.
//!
//! A task per connection costs a tokio task cell and a tokio I/O registration (`ScheduledIo`),
//! two 128-aligned 256-byte blocks: more than half of what an idle connection held
//! (ARCHITECTURE.md, "Per-connection memory budget"). Here a connection is a value in its
//! reactor's slab and its socket is registered, edge-triggered, in the reactor's own epoll set,
//! which tokio watches as one `AsyncFd`. The rest of the relay stays on tokio: the reactor's
//! task is one task among the others, and yields after [`POLLS_PER_TURN`] connection polls.
//!
//! A connection is polled when its socket reports readiness or when something wakes it. The
//! waker a connection hands out (to its outbox) carries no allocation: it is the reactor's
//! number and the connection's slot, and waking it puts the slot on the reactor's ready list
//! and wakes the reactor's task once. A wake for a slot whose connection has left (or a new one
//! in the same slot) costs one poll that finds nothing to do.
//!
//! A connection stays on the reactor that took it; [`Reactors::add`] spreads new connections
//! over the reactors in turn. What a connection does when it leaves (its close handshake, with
//! timers) is its own business ([`Source::exit`]).

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

use futures_util::task::AtomicWaker;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::slab::Slab;

/// Connection polls per turn of a reactor's task, after which it yields to the runtime's other
/// tasks (the HTTP stage, deliverers, the broker) and to tokio's I/O driver.
pub const POLLS_PER_TURN: usize = 128;
/// epoll events taken per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 256;
/// How long the slab's one empty chunk is kept before it is unmapped: long enough that a
/// connection coming and going at a chunk's edge maps and unmaps at most once per period.
const SPARE_CHUNK_HOLD: std::time::Duration = std::time::Duration::from_secs(1);
/// Slots the ready lists keep room for after a wave has left.
const LIST_KEEP: usize = 1024;
/// Reactors a process can start in its life (a relay starts one per runtime worker).
const MAX_REACTORS: usize = 4096;

/// What the reactor asks of a connection.
pub trait Source: Send + Unpin + 'static {
    /// Why the connection left the reactor.
    type Exit: Send;
    /// The socket, registered in the reactor's epoll set while the connection is in the slab.
    fn fd(&self) -> RawFd;
    /// epoll reported an edge: the socket became readable and/or writable (hang-ups and errors
    /// count as both, so the next read or write finds them).
    fn readiness(&mut self, readable: bool, writable: bool);
    /// Do what the socket's readiness and the connection's own work allow, without blocking.
    /// Wakes of `cx`'s waker poll the connection again.
    fn poll(&mut self, cx: &mut Context<'_>) -> Step<Self::Exit>;
    /// The connection left the slab and the epoll set (after `Step::Exit`).
    fn exit(self, exit: Self::Exit);
}

/// The outcome of one poll of a connection.
pub enum Step<E> {
    /// Nothing more to do until readiness or a wake.
    Wait,
    /// More to do, after the other connections had their turn.
    Again,
    /// The connection is done here.
    Exit(E),
}

/// One reactor per runtime worker; new connections go to each in turn.
pub struct Reactors<T> {
    all: Box<[Arc<Shared<T>>]>,
    next: AtomicUsize,
}

/// What other threads reach of a reactor.
struct Shared<T> {
    wakeups: &'static Wakeups,
    /// Connections handed over, not yet in the slab.
    incoming: Mutex<Vec<T>>,
    /// False once the reactor's task is gone (its runtime shut down).
    running: AtomicBool,
}

/// A reactor's ready list and its task's waker. Slot wakers find it by number in `WAKEUPS`,
/// so they carry no pointer; it is never freed (one per reactor, a few per process).
struct Wakeups {
    id: u32,
    ready: ReadyList,
}

/// Slots woken since the reactor's task last looked, and that task's waker, woken when the list
/// stops being empty. Generic over its lock and its waker cell only so that a loom model runs
/// this very code (`tests::loom_*`); the relay uses a `Mutex` and an `AtomicWaker`.
struct ReadyList<L = Mutex<Vec<u32>>, W = AtomicWaker> {
    slots: L,
    task: W,
}

/// The lock around a ready list.
trait SlotLock: Default {
    fn with<R>(&self, f: impl FnOnce(&mut Vec<u32>) -> R) -> R;
}

/// Where the reactor's task leaves its waker.
trait TaskCell: Default {
    fn register(&self, waker: &Waker);
    fn wake(&self);
}

impl SlotLock for Mutex<Vec<u32>> {
    fn with<R>(&self, f: impl FnOnce(&mut Vec<u32>) -> R) -> R {
        f(&mut self.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl TaskCell for AtomicWaker {
    fn register(&self, waker: &Waker) {
        AtomicWaker::register(self, waker);
    }
    fn wake(&self) {
        AtomicWaker::wake(self);
    }
}

impl<L: SlotLock, W: TaskCell> Default for ReadyList<L, W> {
    fn default() -> Self {
        ReadyList {
            slots: L::default(),
            task: W::default(),
        }
    }
}

impl<L: SlotLock, W: TaskCell> ReadyList<L, W> {
    /// Put `slot` on the list; the first slot on an empty list wakes the task (the task takes
    /// the whole list, so later ones find it awake or about to look).
    fn push(&self, slot: u32) {
        let first = self.slots.with(|slots| {
            slots.push(slot);
            slots.len() == 1
        });
        if first {
            self.task.wake();
        }
    }

    /// The task's side: leave `waker`, then move the woken slots into `into`. A push after the
    /// waker is registered either lands in `into` or wakes it.
    fn take(&self, waker: &Waker, into: &mut Vec<u32>) {
        self.task.register(waker);
        self.slots.with(|slots| into.append(slots));
    }

    /// Wake the task for work that is not a slot (a connection handed over).
    fn wake_task(&self) {
        self.task.wake();
    }
}

static WAKEUPS: [OnceLock<&'static Wakeups>; MAX_REACTORS] =
    [const { OnceLock::new() }; MAX_REACTORS];
static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

impl Wakeups {
    fn new() -> io::Result<&'static Wakeups> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        if id >= MAX_REACTORS {
            return Err(io::Error::other(
                "too many reactors started in this process",
            ));
        }
        let wakeups: &'static Wakeups = Box::leak(Box::new(Wakeups {
            id: id as u32,
            ready: ReadyList::default(),
        }));
        let _ = WAKEUPS[id].set(wakeups);
        Ok(wakeups)
    }

    /// The waker of one slot: the reactor's number and the slot, packed in the data pointer.
    fn slot_waker(&self, slot: u32) -> Waker {
        let data = ((self.id as usize) << 32 | slot as usize) as *const ();
        // SAFETY: the vtable's functions only read `data` as a number; nothing is owned.
        #[allow(unsafe_code)]
        unsafe {
            Waker::from_raw(RawWaker::new(data, &SLOT_WAKER))
        }
    }
}

static SLOT_WAKER: RawWakerVTable =
    RawWakerVTable::new(clone_slot_waker, wake_slot, wake_slot, drop_slot_waker);

#[allow(unsafe_code)]
unsafe fn clone_slot_waker(data: *const ()) -> RawWaker {
    RawWaker::new(data, &SLOT_WAKER)
}

#[allow(unsafe_code)]
unsafe fn wake_slot(data: *const ()) {
    let packed = data as usize;
    if let Some(wakeups) = WAKEUPS.get(packed >> 32).and_then(OnceLock::get) {
        wakeups.ready.push(packed as u32);
    }
}

#[allow(unsafe_code)]
unsafe fn drop_slot_waker(_: *const ()) {}

impl<T: Source> Reactors<T> {
    /// Start `count` reactors on the current tokio runtime.
    pub fn start(count: usize) -> io::Result<Reactors<T>> {
        let all = (0..count.max(1))
            .map(|_| Run::start())
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Reactors {
            all: all.into_boxed_slice(),
            next: AtomicUsize::new(0),
        })
    }

    /// Every reactor's task still runs.
    pub fn is_running(&self) -> bool {
        self.all.iter().all(|s| s.running.load(Ordering::Acquire))
    }

    /// Hand a connection to the next reactor. It is polled once there even without readiness.
    pub fn add(&self, conn: T) {
        let n = self.next.fetch_add(1, Ordering::Relaxed) % self.all.len();
        let shared = &self.all[n];
        let mut incoming = shared.incoming.lock().unwrap_or_else(|p| p.into_inner());
        incoming.push(conn);
        drop(incoming);
        shared.wakeups.ready.wake_task();
    }
}

/// A reactor's task: its epoll set, its slab and its lists.
struct Run<T> {
    shared: Arc<Shared<T>>,
    epoll: AsyncFd<OwnedFd>,
    slab: Slab<T>,
    /// Slots to poll in this turn.
    ready: Vec<u32>,
    /// Slots that asked to be polled again after the others.
    again: Vec<u32>,
    /// The list being polled (swapped with `ready`, so neither is reallocated per turn).
    polling: Vec<u32>,
    events: Vec<libc::epoll_event>,
    /// Armed while the slab keeps an empty chunk: when it fires, the chunk is unmapped.
    spare_timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Drop for Run<T> {
    fn drop(&mut self) {
        self.shared.running.store(false, Ordering::Release);
    }
}

impl<T: Source> Run<T> {
    fn start() -> io::Result<Arc<Shared<T>>> {
        let run = Run::new()?;
        let shared = run.shared.clone();
        tokio::spawn(run);
        Ok(shared)
    }

    fn new() -> io::Result<Run<T>> {
        #[allow(unsafe_code)]
        // SAFETY: plain system call; the descriptor it returns is owned by the `OwnedFd`.
        let epoll = unsafe {
            let fd = libc::epoll_create1(libc::EPOLL_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            OwnedFd::from_raw_fd(fd)
        };
        let shared = Arc::new(Shared {
            wakeups: Wakeups::new()?,
            incoming: Mutex::new(Vec::new()),
            running: AtomicBool::new(true),
        });
        #[allow(unsafe_code)]
        // SAFETY: the `AsyncFd` owns the descriptor, so it is deregistered before it closes.
        let epoll = unsafe { AsyncFd::register_with_interest(epoll, Interest::READABLE) }
            .map_err(io::Error::from)?;
        let run = Run {
            shared,
            epoll,
            slab: Slab::default(),
            ready: Vec::new(),
            again: Vec::new(),
            polling: Vec::new(),
            events: vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT],
            spare_timer: None,
        };
        Ok(run)
    }

    fn epoll_ctl(&self, op: libc::c_int, fd: RawFd, slot: u32) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: slot as u64,
        };
        #[allow(unsafe_code)]
        // SAFETY: both descriptors are open (the epoll set is ours, `fd` belongs to a connection
        // in the slab); `event` lives across the call.
        let r = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Move handed-over connections into the slab and the epoll set.
    fn take_incoming(&mut self) {
        let incoming = {
            let mut list = self
                .shared
                .incoming
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if list.is_empty() {
                return;
            }
            std::mem::take(&mut *list)
        };
        for conn in incoming {
            let fd = conn.fd();
            let slot = self.slab.insert(conn);
            match self.epoll_ctl(libc::EPOLL_CTL_ADD, fd, slot) {
                // Polled once: it may have work queued already (its greeting).
                Ok(()) => self.ready.push(slot),
                Err(e) => {
                    tracing::warn!(error = %e, "epoll_ctl(ADD) failed; dropping the connection");
                    self.slab.remove(slot);
                }
            }
        }
    }

    /// Take one batch of epoll events, if the set has any. Returns `Pending` only once the set's
    /// readiness was found cleared, which is when the task's waker is registered for the next
    /// edge: a `Ready` that brought no events (the events were already taken) registers
    /// nothing, so the caller must ask again before it sleeps.
    fn take_events(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut guard = match self.epoll.poll_read_ready(cx) {
            Poll::Ready(Ok(guard)) => guard,
            Poll::Ready(Err(e)) => {
                tracing::error!(error = %e, "reactor: epoll readiness failed");
                return Poll::Pending;
            }
            Poll::Pending => return Poll::Pending,
        };
        let n = loop {
            #[allow(unsafe_code)]
            // SAFETY: `events` has room for EVENTS_PER_WAIT entries; timeout 0 never blocks.
            let n = unsafe {
                libc::epoll_wait(
                    guard.get_inner().as_raw_fd(),
                    self.events.as_mut_ptr(),
                    EVENTS_PER_WAIT as libc::c_int,
                    0,
                )
            };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!(error = %e, "reactor: epoll_wait failed");
                return Poll::Pending;
            }
        };
        if n < EVENTS_PER_WAIT {
            // Drained: the next edge of the set's readiness wakes us.
            guard.clear_ready();
        }
        drop(guard);
        for i in 0..n {
            let (bits, data) = (self.events[i].events, self.events[i].u64);
            let slot = data as u32;
            let Some(conn) = self.slab.get_mut(slot) else {
                continue;
            };
            let readable = bits & (libc::EPOLLIN | libc::EPOLLRDHUP) as u32 != 0;
            let writable = bits & libc::EPOLLOUT as u32 != 0;
            let broken = bits & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
            conn.readiness(readable || broken, writable || broken);
            self.ready.push(slot);
        }
        Poll::Ready(())
    }

    /// Before the task sleeps or yields: give back the slab's kept empty chunk once it has been
    /// empty for `SPARE_CHUNK_HOLD` (a wave that left), with the room the lists grew to for it.
    fn release_spare_when_due(&mut self, cx: &mut Context<'_>) {
        let Some(since) = self.slab.spare_since() else {
            self.spare_timer = None;
            return;
        };
        let due = tokio::time::Instant::from_std(since + SPARE_CHUNK_HOLD);
        let timer = self
            .spare_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() != due {
            timer.as_mut().reset(due);
        }
        if timer.as_mut().poll(cx).is_ready() {
            self.spare_timer = None;
            self.slab.release_spare();
            for list in [&mut self.ready, &mut self.again, &mut self.polling] {
                list.shrink_to(LIST_KEEP);
            }
        }
    }

    fn poll_slot(&mut self, slot: u32) {
        let Some(conn) = self.slab.get_mut(slot) else {
            return;
        };
        let waker = self.shared.wakeups.slot_waker(slot);
        let mut cx = Context::from_waker(&waker);
        // A bug that panics in one connection's code ends that connection, not its reactor
        // and every other connection on it (as it would end only its task when each connection
        // had one). The panic itself is reported by the panic hook.
        let step = catch_unwind(AssertUnwindSafe(|| conn.poll(&mut cx)));
        match step {
            Ok(Step::Wait) => {}
            Ok(Step::Again) => self.again.push(slot),
            Ok(Step::Exit(exit)) => {
                let conn = self.slab.remove(slot).expect("polled above");
                // Before the connection may close its socket.
                let _ = self.epoll_ctl(libc::EPOLL_CTL_DEL, conn.fd(), slot);
                let _ = catch_unwind(AssertUnwindSafe(|| conn.exit(exit)));
            }
            Err(_) => {
                let conn = self.slab.remove(slot).expect("polled above");
                let _ = self.epoll_ctl(libc::EPOLL_CTL_DEL, conn.fd(), slot);
                tracing::error!("a connection panicked; it is dropped");
                let _ = catch_unwind(AssertUnwindSafe(|| drop(conn)));
            }
        }
    }
}

impl<T: Source> Future for Run<T> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let mut polls = 0;
        loop {
            // The waker is registered before the lists are read, so a wake after the reads is
            // not lost.
            this.shared.wakeups.ready.take(cx.waker(), &mut this.ready);
            this.take_incoming();
            this.ready.append(&mut this.again);
            if this.take_events(cx).is_pending() && this.ready.is_empty() {
                // Every source of work was looked at after the waker was registered (the
                // lists) or registered it itself (the epoll set's readiness).
                this.release_spare_when_due(cx);
                return Poll::Pending;
            }
            if this.ready.is_empty() {
                // The set was ready but held nothing (its events were taken already): ask
                // again, so its readiness is cleared and our waker registered.
                continue;
            }
            let mut batch = std::mem::replace(&mut this.ready, std::mem::take(&mut this.polling));
            for (i, &slot) in batch.iter().enumerate() {
                if polls == POLLS_PER_TURN {
                    this.ready.extend_from_slice(&batch[i..]);
                    batch.clear();
                    this.polling = batch;
                    // Let the runtime's other tasks and its I/O driver go first. A fresh
                    // `yield_now` polled once hands our waker to the scheduler, which wakes us
                    // after them (waking ourselves would requeue us before the driver is
                    // polled); dropping the future keeps that deferred wake-up.
                    let _ = std::pin::pin!(tokio::task::yield_now()).poll(cx);
                    this.release_spare_when_due(cx);
                    return Poll::Pending;
                }
                polls += 1;
                this.poll_slot(slot);
            }
            batch.clear();
            this.polling = batch;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_waker_puts_its_slot_on_its_reactors_ready_list_and_wakes_the_task_once() {
        let wakeups = Wakeups::new().expect("a reactor number");
        let (task_waker, woken) = counting_waker();
        let mut slots = Vec::new();
        wakeups.ready.take(&task_waker, &mut slots);
        let waker = wakeups.slot_waker(7);
        waker.wake_by_ref();
        let copy = waker.clone();
        drop(waker);
        copy.wake();
        wakeups.slot_waker(9).wake();
        // The task's waker is taken by the first wake; it registers again when it runs.
        assert_eq!(woken.load(Ordering::SeqCst), 1);
        wakeups.ready.take(&task_waker, &mut slots);
        assert_eq!(slots, vec![7, 7, 9]);
    }

    type LoomList = ReadyList<loom::sync::Mutex<Vec<u32>>, loom::future::AtomicWaker>;

    impl SlotLock for loom::sync::Mutex<Vec<u32>> {
        fn with<R>(&self, f: impl FnOnce(&mut Vec<u32>) -> R) -> R {
            f(&mut self.lock().expect("not poisoned"))
        }
    }

    impl TaskCell for loom::future::AtomicWaker {
        fn register(&self, waker: &Waker) {
            self.register_by_ref(waker);
        }
        fn wake(&self) {
            loom::future::AtomicWaker::wake(self);
        }
    }

    /// The reactor's task as `Run::poll` uses the list: take, and sleep when nothing came
    /// until `want` slots have been seen. A lost wake-up leaves it asleep, which loom reports
    /// as a deadlock.
    fn loom_task(list: &LoomList, want: usize) -> Vec<u32> {
        let mut seen = Vec::new();
        loom::future::block_on(std::future::poll_fn(|cx| {
            list.take(cx.waker(), &mut seen);
            if seen.len() == want {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }));
        seen
    }

    /// Every interleaving with up to three preemptions (tokio's own loom tests use two): the
    /// full search of the two-waker model takes minutes in a debug build.
    fn loom_model(f: impl Fn() + Sync + Send + 'static) {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(f);
    }

    #[test]
    fn loom_a_slot_woken_from_another_thread_is_never_lost() {
        loom_model(|| {
            let list = Arc::new(LoomList::default());
            let waker = {
                let list = list.clone();
                loom::thread::spawn(move || list.push(3))
            };
            assert_eq!(loom_task(&list, 1), vec![3]);
            waker.join().expect("waker thread");
        });
    }

    #[test]
    fn loom_two_wakers_racing_the_task_are_both_seen() {
        loom_model(|| {
            let list = Arc::new(LoomList::default());
            let wakers: Vec<_> = [1, 2]
                .into_iter()
                .map(|slot| {
                    let list = list.clone();
                    loom::thread::spawn(move || list.push(slot))
                })
                .collect();
            let mut seen = loom_task(&list, 2);
            seen.sort_unstable();
            assert_eq!(seen, vec![1, 2]);
            for w in wakers {
                w.join().expect("waker thread");
            }
        });
    }

    /// A stand-in connection: counts its polls, keeps the last waker, panics if told to, and
    /// leaves when `leave` is set.
    struct Probe {
        socket: std::os::unix::net::UnixStream,
        panics: bool,
        polls: Arc<AtomicUsize>,
        waker: Arc<Mutex<Option<Waker>>>,
        leave: Arc<AtomicBool>,
    }

    impl Source for Probe {
        type Exit = ();

        fn fd(&self) -> RawFd {
            self.socket.as_raw_fd()
        }

        fn readiness(&mut self, _: bool, _: bool) {}

        fn poll(&mut self, cx: &mut Context<'_>) -> Step<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            assert!(!self.panics, "a probe that panics");
            if self.leave.load(Ordering::SeqCst) {
                return Step::Exit(());
            }
            Step::Wait
        }

        fn exit(self, _: ()) {}
    }

    fn probe(panics: bool) -> (Probe, std::os::unix::net::UnixStream) {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socket pair");
        ours.set_nonblocking(true).expect("nonblocking");
        let probe = Probe {
            socket: ours,
            panics,
            polls: Arc::new(AtomicUsize::new(0)),
            waker: Arc::new(Mutex::new(None)),
            leave: Arc::new(AtomicBool::new(false)),
        };
        (probe, theirs)
    }

    async fn polls_reach(polls: &AtomicUsize, n: usize) -> bool {
        for _ in 0..200 {
            if polls.load(Ordering::SeqCst) >= n {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_connection_is_polled_on_readiness_and_on_a_wake_and_a_panicking_one_ends_alone() {
        let reactors = Reactors::<Probe>::start(1).expect("a reactor");
        let (bad, _bad_peer) = probe(true);
        let (good, mut good_peer) = probe(false);
        let (bad_polls, polls, waker) = (bad.polls.clone(), good.polls.clone(), good.waker.clone());
        reactors.add(bad);
        reactors.add(good);
        assert!(
            polls_reach(&bad_polls, 1).await,
            "the panicking probe was polled"
        );
        assert!(
            polls_reach(&polls, 1).await,
            "a new connection is polled once"
        );
        let before = polls.load(Ordering::SeqCst);
        std::io::Write::write_all(&mut good_peer, b"x").expect("write");
        assert!(
            polls_reach(&polls, before + 1).await,
            "readable: polled again"
        );
        let before = polls.load(Ordering::SeqCst);
        let slot_waker = waker.lock().unwrap().clone().expect("a waker");
        slot_waker.wake();
        assert!(polls_reach(&polls, before + 1).await, "woken: polled again");
        assert!(reactors.is_running(), "the reactor outlived the panic");
        assert_eq!(
            bad_polls.load(Ordering::SeqCst),
            1,
            "the panicking probe left the slab"
        );
    }

    /// The defect: an epoll set reported ready whose events had already been taken (so the
    /// `epoll_wait` found none) ended the turn without the task's waker registered for the
    /// set's next edge, and the reactor slept through its connections' events until something
    /// else woke it (100,000 connections over six nodes: deliveries 13–25 s late, some never).
    #[tokio::test]
    async fn a_readiness_that_brings_no_events_still_leaves_the_reactor_waiting_for_the_next() {
        let mut run = Run::<Probe>::new().expect("a reactor");
        let (probe, mut peer) = probe(false);
        let polls = probe.polls.clone();
        run.shared.incoming.lock().unwrap().push(probe);
        let (waker, woken) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut run).poll(&mut cx).is_pending());
        assert_eq!(
            polls.load(Ordering::SeqCst),
            1,
            "the new connection was polled"
        );
        let settle = || tokio::time::sleep(std::time::Duration::from_millis(50));

        std::io::Write::write_all(&mut peer, b"x").expect("write");
        settle().await;
        assert_eq!(woken.load(Ordering::SeqCst), 1, "an edge wakes the reactor");
        // Its event is taken behind the reactor's back: the set is still marked ready in tokio,
        // but holds nothing now.
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
        #[allow(unsafe_code)]
        // SAFETY: a live epoll descriptor and a buffer of four events.
        let n = unsafe { libc::epoll_wait(run.epoll.as_raw_fd(), events.as_mut_ptr(), 4, 0) };
        assert_eq!(n, 1);
        assert!(Pin::new(&mut run).poll(&mut cx).is_pending());

        std::io::Write::write_all(&mut peer, b"y").expect("write");
        settle().await;
        assert_eq!(
            woken.load(Ordering::SeqCst),
            2,
            "the next edge must wake the reactor again"
        );
        assert!(Pin::new(&mut run).poll(&mut cx).is_pending());
        assert_eq!(
            polls.load(Ordering::SeqCst),
            2,
            "and its connection is polled"
        );
    }

    /// The defect: a slab chunk emptied by connections that left stayed mapped (60 KiB each,
    /// one per reactor) for as long as the relay ran, a sixth of what a churn left behind.
    #[tokio::test]
    async fn a_chunk_left_empty_goes_back_to_the_system_after_the_hold() {
        let mut run = Run::<Probe>::new().expect("a reactor");
        let (waker, woken) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let mut probes = Vec::new();
        for _ in 0..=crate::slab::CHUNK {
            let (probe, peer) = probe(false);
            let leave = probe.leave.clone();
            run.shared.incoming.lock().unwrap().push(probe);
            probes.push((leave, peer));
        }
        // A turn polls at most POLLS_PER_TURN connections, and each is polled once as it
        // arrives and once for its first readiness (writable).
        for _ in 0..4 * (crate::slab::CHUNK / POLLS_PER_TURN + 1) {
            let _ = Pin::new(&mut run).poll(&mut cx);
        }
        assert_eq!(run.slab.mapped(), 2);

        // The one connection in the second chunk leaves.
        let (leave, _peer) = probes.pop().expect("the last probe");
        leave.store(true, Ordering::SeqCst);
        run.shared
            .wakeups
            .slot_waker(crate::slab::CHUNK as u32)
            .wake();
        for _ in 0..4 {
            let _ = Pin::new(&mut run).poll(&mut cx);
        }
        assert!(
            run.slab.spare_since().is_some(),
            "its chunk is kept for a while"
        );
        assert_eq!(run.slab.mapped(), 2);

        let before = woken.load(Ordering::SeqCst);
        tokio::time::sleep(SPARE_CHUNK_HOLD + std::time::Duration::from_millis(200)).await;
        assert!(
            woken.load(Ordering::SeqCst) > before,
            "the hold's end wakes the reactor"
        );
        assert!(Pin::new(&mut run).poll(&mut cx).is_pending());
        assert_eq!(run.slab.mapped(), 1, "the empty chunk was unmapped");
        assert_eq!(run.slab.spare_since(), None);
    }

    fn counting_waker() -> (Waker, Arc<AtomicUsize>) {
        struct Count(Arc<AtomicUsize>);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(AtomicUsize::new(0));
        (Waker::from(Arc::new(Count(count.clone()))), count)
    }
}
