//! Where a reactor keeps its connections: slots that never move, in chunks that go back to the
//! system when they empty.
//!
//! A wave of connections that joins and leaves must not leave its slots behind: a chunk is a
//! memory mapping of its own (not a heap block, which would share allocator pages with blocks
//! that stay), slots are filled lowest first so the long-lived connections pack into the first
//! chunks, and a chunk that empties is unmapped, except one kept empty so that a connection
//! coming and going at a chunk's edge does not map and unmap on every join. The kept chunk goes
//! too once it has stayed empty for a while (the reactor calls `release_spare` on a timer): a
//! wave that leaves gives back all of its chunks.

use std::marker::PhantomData;
use std::mem::size_of;
use std::ptr::NonNull;
use std::time::Instant;

/// Slots per chunk. With 120-byte slots (a connection) a chunk is 61,440 B: exactly 15 pages.
pub const CHUNK: usize = 512;
const WORDS: usize = CHUNK / 64;
const PAGE: usize = 4096;

/// A slab of `T` whose slots never move.
pub struct Slab<T> {
    chunks: Vec<Option<Chunk<T>>>,
    /// Mapped chunks that hold nothing (at most one is kept).
    empty: usize,
    /// When the kept empty chunk last became empty.
    spare_since: Option<Instant>,
}

/// `CHUNK` slots in one anonymous mapping, and which of them are taken.
struct Chunk<T> {
    slots: NonNull<Option<T>>,
    taken: [u64; WORDS],
    live: usize,
    _owns: PhantomData<T>,
}

// SAFETY: a chunk owns its slots' values as a `Box<[Option<T>]>` would.
#[allow(unsafe_code)]
unsafe impl<T: Send> Send for Chunk<T> {}

impl<T> Chunk<T> {
    fn bytes() -> usize {
        (CHUNK * size_of::<Option<T>>()).div_ceil(PAGE) * PAGE
    }

    fn map() -> Chunk<T> {
        const { assert!(std::mem::align_of::<Option<T>>() <= PAGE) };
        #[allow(unsafe_code)]
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::bytes(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            // As the global allocator does when the system has no memory left.
            std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(Self::bytes(), PAGE).expect("page layout"),
            );
        }
        let slots = NonNull::new(p.cast::<Option<T>>()).expect("mmap returned a mapping");
        for i in 0..CHUNK {
            #[allow(unsafe_code)]
            // SAFETY: `i` is within the mapping, which is page-aligned (so aligned for `T`) and
            // writable; the slot held nothing to drop.
            unsafe {
                slots.as_ptr().add(i).write(None)
            };
        }
        Chunk {
            slots,
            taken: [0; WORDS],
            live: 0,
            _owns: PhantomData,
        }
    }

    fn slot(&mut self, i: usize) -> &mut Option<T> {
        assert!(i < CHUNK);
        #[allow(unsafe_code)]
        // SAFETY: in bounds, initialised by `map`, and borrowed through `&mut self`.
        unsafe {
            &mut *self.slots.as_ptr().add(i)
        }
    }

    fn first_free(&self) -> Option<usize> {
        self.taken
            .iter()
            .enumerate()
            .find(|(_, w)| **w != u64::MAX)
            .map(|(n, w)| n * 64 + (!w).trailing_zeros() as usize)
    }
}

impl<T> Drop for Chunk<T> {
    fn drop(&mut self) {
        for i in 0..CHUNK {
            self.slot(i).take();
        }
        #[allow(unsafe_code)]
        // SAFETY: the mapping made by `map`, whose values were all dropped above.
        unsafe {
            libc::munmap(self.slots.as_ptr().cast(), Self::bytes());
        }
    }
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            chunks: Vec::new(),
            empty: 0,
            spare_since: None,
        }
    }
}

impl<T> Slab<T> {
    /// Put `value` in the lowest free slot; returns the slot.
    pub fn insert(&mut self, value: T) -> u32 {
        let n = match self
            .chunks
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.live < CHUNK))
        {
            Some(n) => n,
            None => {
                let n = match self.chunks.iter().position(Option::is_none) {
                    Some(n) => n,
                    None => {
                        self.chunks.push(None);
                        self.chunks.len() - 1
                    }
                };
                self.chunks[n] = Some(Chunk::map());
                self.empty += 1;
                n
            }
        };
        let chunk = self.chunks[n].as_mut().expect("chosen above");
        let i = chunk.first_free().expect("chosen with room");
        chunk.taken[i / 64] |= 1 << (i % 64);
        if chunk.live == 0 {
            self.empty -= 1;
            if self.empty == 0 {
                self.spare_since = None;
            }
        }
        chunk.live += 1;
        *chunk.slot(i) = Some(value);
        (n * CHUNK + i) as u32
    }

    pub fn get_mut(&mut self, slot: u32) -> Option<&mut T> {
        let slot = slot as usize;
        self.chunks
            .get_mut(slot / CHUNK)?
            .as_mut()?
            .slot(slot % CHUNK)
            .as_mut()
    }

    pub fn remove(&mut self, slot: u32) -> Option<T> {
        let (n, i) = (slot as usize / CHUNK, slot as usize % CHUNK);
        let chunk = self.chunks.get_mut(n)?.as_mut()?;
        let value = chunk.slot(i).take()?;
        chunk.taken[i / 64] &= !(1 << (i % 64));
        chunk.live -= 1;
        if chunk.live == 0 {
            if self.empty == 0 {
                self.empty = 1;
                self.spare_since = Some(Instant::now());
            } else {
                self.unmap(n);
            }
        }
        Some(value)
    }

    fn unmap(&mut self, n: usize) {
        self.chunks[n] = None;
        while self.chunks.last().is_some_and(Option::is_none) {
            self.chunks.pop();
        }
    }

    /// Since when an empty chunk has been kept, if one is.
    pub fn spare_since(&self) -> Option<Instant> {
        self.spare_since
    }

    /// Unmap the kept empty chunk, if there is one.
    pub fn release_spare(&mut self) {
        if self.spare_since.take().is_none() {
            return;
        }
        if let Some(n) = self
            .chunks
            .iter()
            .position(|c| c.as_ref().is_some_and(|c| c.live == 0))
        {
            self.unmap(n);
        }
        self.empty = 0;
    }

    /// Chunks mapped now.
    #[cfg(test)]
    pub(crate) fn mapped(&self) -> usize {
        self.chunks.iter().flatten().count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_lowest_first_and_never_move() {
        let mut slab = Slab::default();
        let slots: Vec<u32> = (0..CHUNK as u32 + 3).map(|i| slab.insert(i)).collect();
        assert_eq!(slots, (0..CHUNK as u32 + 3).collect::<Vec<_>>());
        assert_eq!(slab.mapped(), 2);
        assert_eq!(slab.remove(9), Some(9));
        assert_eq!(slab.remove(5), Some(5));
        assert_eq!(slab.remove(5), None);
        assert_eq!(slab.get_mut(5), None);
        assert_eq!(slab.insert(99), 5);
        assert_eq!(slab.insert(98), 9);
        assert_eq!(slab.get_mut(5), Some(&mut 99));
        assert_eq!(
            slab.get_mut(CHUNK as u32 + 2),
            Some(&mut (CHUNK as u32 + 2))
        );
        assert_eq!(slab.get_mut(10_000), None);
        assert_eq!(slab.remove(10_000), None);
    }

    #[test]
    fn a_wave_that_leaves_gives_its_chunks_back_but_one() {
        let mut slab = Slab::default();
        let steady: Vec<u32> = (0..100).map(|i| slab.insert(i)).collect();
        let wave: Vec<u32> = (0..5 * CHUNK as u32).map(|i| slab.insert(i)).collect();
        assert_eq!(slab.mapped(), 6);
        for slot in wave {
            slab.remove(slot);
        }
        // The steady values' chunk and one empty chunk.
        assert_eq!(slab.mapped(), 2);
        for slot in &steady {
            assert!(slab.get_mut(*slot).is_some());
        }
        // The kept empty chunk is used before a new one is mapped.
        for i in 0..2 * CHUNK as u32 {
            slab.insert(i);
        }
        assert_eq!(slab.mapped(), 3);
        for slot in steady {
            slab.remove(slot);
        }
        assert_eq!(slab.mapped(), 3, "the first chunk still holds values");
    }

    #[test]
    fn the_kept_empty_chunk_goes_back_when_released() {
        let mut slab = Slab::default();
        let steady = slab.insert(0);
        let wave: Vec<u32> = (0..2 * CHUNK as u32).map(|i| slab.insert(i)).collect();
        assert_eq!(slab.mapped(), 3);
        for slot in wave {
            slab.remove(slot);
        }
        assert_eq!(slab.mapped(), 2, "one empty chunk is kept");
        assert!(slab.spare_since().is_some(), "an empty chunk is kept");
        slab.release_spare();
        assert_eq!(slab.mapped(), 1, "only the steady value's chunk is left");
        assert_eq!(slab.spare_since(), None);
        assert!(slab.get_mut(steady).is_some());

        // A kept chunk that takes a value again is no longer a spare.
        let more: Vec<u32> = (0..CHUNK as u32).map(|i| slab.insert(i)).collect();
        assert_eq!(
            more[CHUNK - 1],
            CHUNK as u32,
            "the first chunk filled, then a second"
        );
        slab.remove(more[CHUNK - 1]);
        assert!(
            slab.spare_since().is_some(),
            "the second chunk is kept empty"
        );
        slab.remove(more[4]);
        assert_eq!(slab.insert(1), more[4], "lowest first");
        assert!(slab.spare_since().is_some());
        assert_eq!(slab.insert(2), CHUNK as u32);
        assert_eq!(
            slab.spare_since(),
            None,
            "the kept chunk holds a value again"
        );
    }

    #[test]
    fn values_left_in_a_dropped_slab_are_dropped() {
        let counter = std::sync::Arc::new(());
        let mut slab = Slab::default();
        for _ in 0..CHUNK + 1 {
            slab.insert(counter.clone());
        }
        assert_eq!(std::sync::Arc::strong_count(&counter), CHUNK + 2);
        drop(slab);
        assert_eq!(std::sync::Arc::strong_count(&counter), 1);
    }
}
