//! The metrics upkeep gives back the memory of the histogram samples it folds into buckets, and
//! the fan-out's own latency histogram keeps no samples at all.
//!
//! The Prometheus exporter keeps every histogram sample until the upkeep (in blocks of 64
//! samples, 1,280 B each), then frees the drained blocks through crossbeam's epoch-based
//! collector. Without `roomcast::metrics::upkeep`'s extra pins that collector ran them only tens
//! of seconds later in an idle relay: after a join burst (a latency sample per presence
//! delivery) ~125 B per connection. This binary counts the heap's live bytes under a counting
//! allocator (the relay's own underneath) while a burst of samples is recorded and upkept.
#![allow(unsafe_code)] // a GlobalAlloc is an unsafe impl; it only forwards and counts

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Mutex;

use roomcast::alloc::RelayAlloc;

struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to `RelayAlloc` unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { RelayAlloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { RelayAlloc.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { RelayAlloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: the caller's contract, passed on.
        unsafe { RelayAlloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> isize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

/// The count is process-wide: the tests here take turns.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn the_upkeep_gives_back_the_blocks_of_the_samples_it_folded() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    const SAMPLES: usize = 100_000;
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        let latency = metrics::histogram!("roomcast_test_publish_to_write_seconds");
        // Registered and upkept once, so what follows is the samples alone.
        latency.record(0.0);
        roomcast::metrics::upkeep(&handle);
        let before = live();
        for _ in 0..SAMPLES {
            latency.record(0.0);
        }
        let held = live() - before;
        // 16 B per sample: the (value, time) pairs in their blocks.
        assert!(
            held >= (SAMPLES * 16) as isize,
            "the samples were kept until the upkeep: {held} B"
        );
        roomcast::metrics::upkeep(&handle);
        let left = live() - before;
        assert!(
            left < held / 20,
            "after the upkeep {left} B of the samples' {held} B are still held"
        );
    });
    assert!(handle
        .render()
        .contains("roomcast_test_publish_to_write_seconds"));
}

/// A fan-out records a zero latency for every member it wrote to at once (100,000 a second at
/// 100,000 deliveries/s). The exporter kept each such sample (16 B) until its upkeep; the
/// relay's own histogram only counts them.
#[test]
fn a_fan_out_s_latency_samples_hold_no_memory() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    metrics::with_local_recorder(&recorder, || {
        let metrics = roomcast::metrics::Metrics::new();
        let latency = &metrics.publish_to_write_seconds;
        latency.record_many(0.0, 1);
        let before = live();
        // A thousand fan-outs of 100 members each.
        for _ in 0..1_000 {
            latency.record_many(0.0, 100);
        }
        let held = live() - before;
        assert!(
            held < 1024,
            "100,000 latency samples hold {held} B until an upkeep"
        );
    });
}
