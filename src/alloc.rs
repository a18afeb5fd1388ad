//! Giving freed memory back to the system.
//!
//! mimalloc returns ("purges") freed pages lazily, and only from within allocator calls on the
//! thread that owns them; a relay that just closed thousands of connections and went quiet would
//! keep that memory resident indefinitely. Each runtime worker therefore asks mimalloc to
//! collect its own heap when it goes idle, at most once per `TRIM_INTERVAL`, so memory returns
//! near its starting level after a wave of connections leaves.

use std::cell::Cell;
use std::time::{Duration, Instant};

const TRIM_INTERVAL: Duration = Duration::from_secs(1);

thread_local! {
    static LAST_TRIM: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Call from a runtime worker about to park. Cheap when a trim is not due.
pub fn trim_if_due() {
    LAST_TRIM.with(|last| {
        let now = Instant::now();
        if last
            .get()
            .is_some_and(|t| now.duration_since(t) < TRIM_INTERVAL)
        {
            return;
        }
        last.set(Some(now));
        collect_this_thread();
    });
}

#[allow(unsafe_code)]
fn collect_this_thread() {
    // SAFETY: mi_collect only walks and releases the calling thread's own mimalloc heap; it has
    // no preconditions beyond mimalloc being the allocator, which the binary guarantees.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
