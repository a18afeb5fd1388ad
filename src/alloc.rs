//! The relay's allocator: mimalloc, with what a connection keeps for its life in a heap of its
//! own, and freed memory given back to the system.
//!
//! **Two heaps.** A connection's lifelong blocks (its outbox, its sender and name, its place in
//! a room's member map) are made during bursts of short-lived ones: the upgrade's buffers, the
//! greeting and presence frames, replies from Redis. In one heap they share allocator pages, and
//! once the burst is freed each page is held resident by the few lifelong blocks left in it:
//! over six nodes and one Redis that was ~120 B of RSS per connection. Allocations made inside
//! [`long_lived`] come from a second mimalloc heap, so lifelong blocks pack densely and the
//! pages of a burst empty and go back whole. Costs: one thread-local read per allocation, and
//! a partly filled page per size class and thread in the second heap.
//!
//! **Giving back.** mimalloc returns ("purges") freed pages lazily, and only from within
//! allocator calls on the thread that owns them; a relay that just closed thousands of
//! connections and went quiet would keep that memory resident indefinitely. Each runtime worker
//! therefore asks mimalloc to collect both heaps when it goes idle, at most once per
//! `TRIM_INTERVAL`, so memory returns near its starting level after a wave of connections leaves.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::time::{Duration, Instant};

use libmimalloc_sys as mi;

const TRIM_INTERVAL: Duration = Duration::from_secs(1);

thread_local! {
    static LAST_TRIM: Cell<Option<Instant>> = const { Cell::new(None) };
    /// Whether this thread is inside [`long_lived`].
    static LONG_LIVED: Cell<bool> = const { Cell::new(false) };
}

/// The heap of lifelong blocks, made on first use and never deleted.
static LONG_HEAP: AtomicPtr<mi::mi_heap_t> = AtomicPtr::new(std::ptr::null_mut());

/// The relay's global allocator (set in `main.rs`): mimalloc's default heap, or the heap of
/// lifelong blocks inside [`long_lived`].
pub struct RelayAlloc;

/// Run `f` with its allocations taken from the heap of lifelong blocks. For what a connection
/// keeps until it closes: a block that is freed soon (or reallocated as it grows) belongs in the
/// default heap, or it leaves holes where the lifelong blocks should pack.
pub fn long_lived<R>(f: impl FnOnce() -> R) -> R {
    /// Puts the thread's flag back even if `f` panics (a connection's panic is caught and the
    /// thread goes on; it must not go on allocating everything in the lifelong heap).
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            let was = self.0;
            let _ = LONG_LIVED.try_with(|l| l.set(was));
        }
    }
    let _restore = Restore(LONG_LIVED.with(|l| l.replace(true)));
    f()
}

/// The heap of lifelong blocks, for the memory tests that walk mimalloc's pages.
pub fn long_lived_heap() -> *mut mi::mi_heap_t {
    let heap = LONG_HEAP.load(Ordering::Acquire);
    if !heap.is_null() {
        return heap;
    }
    #[allow(unsafe_code)]
    // SAFETY: makes a first-class heap; mimalloc v3 heaps may be allocated from on any thread.
    let new = unsafe { mi::mi_heap_new() };
    match LONG_HEAP.compare_exchange(
        std::ptr::null_mut(),
        new,
        Ordering::AcqRel,
        Ordering::Acquire,
    ) {
        Ok(_) => new,
        Err(first) => {
            // Another thread made one first; this one holds nothing yet.
            #[allow(unsafe_code)]
            // SAFETY: `new` was made above, is empty and known to no one else.
            unsafe {
                mi::mi_heap_delete(new)
            };
            first
        }
    }
}

fn inside_long_lived() -> bool {
    // A thread being torn down allocates in the default heap.
    LONG_LIVED.try_with(Cell::get).unwrap_or(false)
}

/// The alignment every mimalloc block has (`MI_MAX_ALIGN_SIZE` on 64-bit targets).
const MI_MAX_ALIGN: usize = 16;

/// Whether a plain mimalloc block already has the layout's alignment (the std allocator makes
/// the same test before it calls `malloc`). Asking for an aligned block when it is not needed
/// costs a size class: mimalloc's aligned path serves a size only from a page of that size that
/// already has a free block, and otherwise over-allocates (`size + align - 1`) from the next
/// class, and no page of the exact size is ever made. Every 112-B outbox took a 128-B block and
/// every 48-B sender a 64-B one that way.
fn plain(size: usize, align: usize) -> bool {
    align <= MI_MAX_ALIGN && align <= size
}

#[allow(unsafe_code)]
// SAFETY: each method forwards to mimalloc with the layout's size, and its alignment unless a
// plain block has it (`plain`); mimalloc frees and reallocates a block of either heap from any
// thread.
unsafe impl GlobalAlloc for RelayAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: as for `MiMalloc::alloc`; the heap lives for the process.
        unsafe {
            match (inside_long_lived(), plain(size, align)) {
                (true, true) => mi::mi_heap_malloc(long_lived_heap(), size),
                (true, false) => mi::mi_heap_malloc_aligned(long_lived_heap(), size, align),
                (false, true) => mi::mi_malloc(size),
                (false, false) => mi::mi_malloc_aligned(size, align),
            }
            .cast()
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        // SAFETY: as for `MiMalloc::alloc_zeroed`; the heap lives for the process.
        unsafe {
            match (inside_long_lived(), plain(size, align)) {
                (true, true) => mi::mi_heap_zalloc(long_lived_heap(), size),
                (true, false) => mi::mi_heap_zalloc_aligned(long_lived_heap(), size, align),
                (false, true) => mi::mi_zalloc(size),
                (false, false) => mi::mi_zalloc_aligned(size, align),
            }
            .cast()
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { mi::mi_free(ptr.cast()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        let ptr = ptr.cast();
        // SAFETY: as for `MiMalloc::realloc`; the heap lives for the process.
        unsafe {
            match (inside_long_lived(), plain(new_size, align)) {
                (true, true) => mi::mi_heap_realloc(long_lived_heap(), ptr, new_size),
                (true, false) => {
                    mi::mi_heap_realloc_aligned(long_lived_heap(), ptr, new_size, align)
                }
                (false, true) => mi::mi_realloc(ptr, new_size),
                (false, false) => mi::mi_realloc_aligned(ptr, new_size, align),
            }
            .cast()
        }
    }
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
    // SAFETY: mi_collect only walks and releases the calling thread's part of mimalloc's default
    // heap, mi_heap_collect its part of the lifelong heap (which lives for the process); neither
    // has preconditions beyond mimalloc being the allocator, which the binary guarantees.
    unsafe {
        mi::mi_collect(true);
        let long = LONG_HEAP.load(Ordering::Acquire);
        if !long.is_null() {
            mi::mi_heap_collect(long, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    extern "C" {
        /// The heap a block belongs to (mimalloc v3; not in libmimalloc-sys's bindings).
        fn mi_heap_of(p: *const std::ffi::c_void) -> *mut mi::mi_heap_t;
    }

    #[allow(unsafe_code)]
    fn heap_of(p: *mut u8) -> *mut mi::mi_heap_t {
        // SAFETY: `p` is a live mimalloc block.
        unsafe { mi_heap_of(p.cast()) }
    }

    #[test]
    #[allow(unsafe_code)]
    fn a_block_takes_its_own_size_class_and_keeps_its_alignment() {
        // Sizes whose class is not a power of two: the aligned path put each in the next class.
        for size in [48, 80, 96, 112, 160, 192, 224, 320, 448] {
            for align in [8, 16] {
                let layout = Layout::from_size_align(size, align).expect("layout");
                // SAFETY: each block is freed once, with its layout.
                unsafe {
                    let blocks: Vec<*mut u8> = (0..64)
                        .flat_map(|_| {
                            [
                                RelayAlloc.alloc(layout),
                                long_lived(|| RelayAlloc.alloc(layout)),
                            ]
                        })
                        .collect();
                    for &p in &blocks {
                        assert_eq!(p as usize % MI_MAX_ALIGN, 0, "{size} B, align {align}");
                        assert_eq!(
                            mi::mi_usable_size(p.cast()),
                            mi::mi_good_size(size),
                            "{size} B, align {align}: a block of its own class"
                        );
                    }
                    let grown = RelayAlloc.realloc(blocks[0], layout, size + 100);
                    assert_eq!(grown as usize % MI_MAX_ALIGN, 0);
                    assert_eq!(
                        mi::mi_usable_size(grown.cast()),
                        mi::mi_good_size(size + 100)
                    );
                    RelayAlloc.dealloc(grown, layout);
                    for &p in &blocks[1..] {
                        RelayAlloc.dealloc(p, layout);
                    }
                }
            }
        }
        // Over-aligned layouts still get their alignment.
        for align in [32, 64, 4096] {
            let layout = Layout::from_size_align(200, align).expect("layout");
            // SAFETY: freed once, with its layout.
            unsafe {
                let p = RelayAlloc.alloc(layout);
                assert_eq!(p as usize % align, 0);
                RelayAlloc.dealloc(p, layout);
            }
        }
    }

    #[test]
    #[allow(unsafe_code)]
    fn blocks_made_inside_long_lived_come_from_their_own_heap() {
        let layout = Layout::from_size_align(112, 16).expect("layout");
        // SAFETY: each block is freed once, with its layout.
        unsafe {
            let (lifelong, grown, zeroed) = long_lived(|| {
                let grown = RelayAlloc.alloc(layout);
                let grown = RelayAlloc.realloc(grown, layout, 4000);
                let nested = long_lived(|| RelayAlloc.alloc_zeroed(layout));
                (RelayAlloc.alloc(layout), grown, nested)
            });
            let short = RelayAlloc.alloc(layout);
            assert_eq!(heap_of(lifelong), long_lived_heap());
            assert_eq!(heap_of(grown), long_lived_heap());
            assert_eq!(heap_of(zeroed), long_lived_heap());
            assert_ne!(
                heap_of(short),
                long_lived_heap(),
                "outside: the default heap"
            );
            assert!(std::slice::from_raw_parts(zeroed, 112)
                .iter()
                .all(|b| *b == 0));
            let _ = std::panic::catch_unwind(|| long_lived(|| panic!("a connection's bug")));
            let after_panic = RelayAlloc.alloc(layout);
            assert_ne!(
                heap_of(after_panic),
                long_lived_heap(),
                "the flag is put back"
            );
            RelayAlloc.dealloc(after_panic, layout);
            for p in [lifelong, zeroed, short] {
                RelayAlloc.dealloc(p, layout);
            }
            RelayAlloc.dealloc(grown, Layout::from_size_align(4000, 16).expect("layout"));
        }
    }
}
