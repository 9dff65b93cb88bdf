//! Bounded lock-free single-producer single-consumer ring.
//!
//! The engine feeds workers, and workers report back, through these rings: no locks, no
//! allocation after construction, one cache line written per side per batch.
//!
//! Layout and protocol (after DPDK's `rte_ring` and rtrb):
//! - `tail` is the next slot the producer fills, `head` the next slot the consumer
//!   empties; both are free-running counters (slot = counter & mask) on separate cache
//!   lines so the two threads never write the same line.
//! - Each side keeps a private copy of the other side's counter and reloads it only when
//!   the ring looks full (producer) or empty (consumer), so in steady state a side reads
//!   no line the other one writes.
//! - Orderings, pairwise:
//!   - **R1/A1**: the producer's `Release` store of `tail` publishes the slot writes
//!     before it; the consumer's `Acquire` load of `tail` makes them visible before it
//!     reads those slots.
//!   - **R2/A2**: the consumer's `Release` store of `head` publishes that it has finished
//!     reading the slots before it; the producer's `Acquire` load of `head` orders its
//!     next writes into those slots after those reads.
//!
//! Batch operations move many items and publish the counter once.

use crate::sync::{Arc, AtomicUsize, Ordering, UnsafeCell};
use crossbeam_utils::CachePadded;
use std::fmt;
use std::mem::MaybeUninit;

struct Shared<T> {
    /// Next slot the consumer reads. Written only by the consumer (R2).
    head: CachePadded<AtomicUsize>,
    /// Next slot the producer writes. Written only by the producer (R1).
    tail: CachePadded<AtomicUsize>,
    /// `SLOT_PAD` unused slots, then `capacity` slots, then `SLOT_PAD` more: the padding
    /// keeps the slots' cache lines from being shared with whatever the allocator put
    /// next to them.
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
    mask: usize,
}

/// Slots of padding on each side of the ring's storage: at least 128 bytes (two cache
/// lines, for the adjacent-line prefetcher).
const fn slot_pad<T>() -> usize {
    match std::mem::size_of::<T>() {
        0 => 0,
        size => 128usize.div_ceil(size),
    }
}

// SAFETY: the protocol above gives each slot exactly one accessor at a time: the producer
// owns slots in [tail, head + capacity), the consumer owns [head, tail). Values of `T`
// cross threads, hence `T: Send`.
unsafe impl<T: Send> Send for Shared<T> {}
// SAFETY: as above; the shared state is only the two atomics and the slots they guard.
unsafe impl<T: Send> Sync for Shared<T> {}

impl<T> Shared<T> {
    #[inline(always)]
    fn slot(&self, index: usize) -> &UnsafeCell<MaybeUninit<T>> {
        let i = slot_pad::<T>() + (index & self.mask);
        debug_assert!(i < self.slots.len());
        // SAFETY: the storage holds `capacity = mask + 1` slots after `slot_pad` padding
        // slots (and as many after), so the masked index plus the padding is in bounds.
        unsafe { self.slots.get_unchecked(i) }
    }

    fn capacity(&self) -> usize {
        self.mask + 1
    }
}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        // Both sides are gone (this is the last reference) and each published its final
        // counter in its own `Drop`, so [head, tail) holds exactly the unconsumed items.
        let head = self.head.load(Ordering::Relaxed);
        let tail = self.tail.load(Ordering::Relaxed);
        let mut i = head;
        while i != tail {
            self.slot(i).with_mut(|p| {
                // SAFETY: slots in [head, tail) were written by the producer and not yet
                // read by the consumer; we have exclusive access in `drop`.
                unsafe { (*p).assume_init_drop() }
            });
            i = i.wrapping_add(1);
        }
    }
}

/// The ring was full; the value is handed back.
#[derive(PartialEq, Eq)]
pub struct Full<T>(pub T);

impl<T> fmt::Debug for Full<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Full(..)")
    }
}

impl<T> fmt::Display for Full<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ring is full")
    }
}

impl<T> std::error::Error for Full<T> {}

/// The writing end. `Send` but not `Sync`: exactly one thread produces.
pub struct Producer<T> {
    shared: Arc<Shared<T>>,
    /// Our `tail`; the shared one is a published copy.
    tail: usize,
    /// Last `head` we loaded (A2); stale values only under-report free space.
    cached_head: usize,
}

/// The reading end. `Send` but not `Sync`: exactly one thread consumes.
pub struct Consumer<T> {
    shared: Arc<Shared<T>>,
    /// Our `head`; the shared one is a published copy.
    head: usize,
    /// Last `tail` we loaded (A1); stale values only under-report items.
    cached_tail: usize,
    /// The `head` last published (R2).
    published_head: usize,
    /// Publish `head` after this many single pops even when more items are known.
    publish_every: usize,
}

/// A ring of at least `capacity` slots (rounded up to a power of two).
///
/// # Panics
/// If `capacity` is 0 or rounds up past `usize::MAX / 2`.
pub fn channel<T>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    assert!(capacity > 0, "ring capacity must be at least 1");
    let capacity = capacity
        .checked_next_power_of_two()
        .filter(|c| *c <= usize::MAX / 2)
        .expect("ring capacity too large");
    let slots = (0..capacity + 2 * slot_pad::<T>())
        .map(|_| UnsafeCell::new(MaybeUninit::uninit()))
        .collect();
    let shared = Arc::new(Shared {
        head: CachePadded::new(AtomicUsize::new(0)),
        tail: CachePadded::new(AtomicUsize::new(0)),
        slots,
        mask: capacity - 1,
    });
    (
        Producer {
            shared: shared.clone(),
            tail: 0,
            cached_head: 0,
        },
        Consumer {
            shared,
            head: 0,
            cached_tail: 0,
            published_head: 0,
            publish_every: (capacity / 16).max(1),
        },
    )
}

impl<T> Producer<T> {
    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.shared.capacity()
    }

    /// Free slots, refreshing our view of the consumer only when needed for `wanted`.
    #[inline(always)]
    fn free_slots(&mut self, wanted: usize) -> usize {
        let capacity = self.shared.capacity();
        let mut free = capacity - self.tail.wrapping_sub(self.cached_head);
        if free < wanted {
            // A2: pairs with the consumer's Release store of `head` (R2).
            self.cached_head = self.shared.head.load(Ordering::Acquire);
            free = capacity - self.tail.wrapping_sub(self.cached_head);
        }
        free
    }

    /// Free slots as of now.
    pub fn slots(&mut self) -> usize {
        self.free_slots(usize::MAX)
    }

    #[inline(always)]
    fn write(&mut self, value: T) {
        self.shared.slot(self.tail).with_mut(|p| {
            // SAFETY: the slot at `tail` is free (checked by the caller against `head`),
            // and only the producer writes free slots.
            unsafe { (*p).write(value) };
        });
        self.tail = self.tail.wrapping_add(1);
    }

    #[inline(always)]
    fn publish(&self) {
        // R1: pairs with the consumer's Acquire load of `tail` (A1).
        self.shared.tail.store(self.tail, Ordering::Release);
    }

    /// Push one value, or hand it back when the ring is full.
    #[inline]
    pub fn push(&mut self, value: T) -> Result<(), Full<T>> {
        if self.free_slots(1) == 0 {
            return Err(Full(value));
        }
        self.write(value);
        self.publish();
        Ok(())
    }

    /// Push as many items from `items` as fit, publishing once; items not taken stay in
    /// the iterator. Returns how many were pushed.
    pub fn push_batch<I: Iterator<Item = T>>(&mut self, items: &mut I) -> usize {
        let free = self.free_slots(items.size_hint().0.max(1));
        let mut pushed = 0;
        while pushed < free {
            let Some(item) = items.next() else { break };
            self.write(item);
            pushed += 1;
        }
        if pushed > 0 {
            self.publish();
        }
        pushed
    }

    /// Copy as many of `items` as fit, publishing once. Returns how many were pushed.
    ///
    /// The free slots are at most two contiguous runs (before and after the wrap), each
    /// filled with one bulk copy: whole-cache-line stores instead of one store per item.
    #[inline]
    pub fn push_slice(&mut self, items: &[T]) -> usize
    where
        T: Copy,
    {
        let n = self.free_slots(items.len()).min(items.len());
        if n == 0 {
            return 0;
        }
        let capacity = self.shared.capacity();
        let first = self.tail & self.shared.mask;
        let (head_part, wrapped_part) = items[..n].split_at(n.min(capacity - first));
        for (part, start) in [(head_part, first), (wrapped_part, 0)] {
            if part.is_empty() {
                continue;
            }
            self.shared.slot(start).with_mut(|p| {
                // SAFETY: slots [start, start + part.len()) are free (checked against
                // `head` above), contiguous (the run stops at the wrap), and only the
                // producer writes free slots. `MaybeUninit<T>` and `UnsafeCell` are
                // layout-compatible with `T`.
                unsafe { std::ptr::copy_nonoverlapping(part.as_ptr(), p.cast::<T>(), part.len()) }
            });
        }
        self.tail = self.tail.wrapping_add(n);
        self.publish();
        n
    }

    /// Whether the consumer has been dropped (nothing pushed will be read).
    pub fn is_abandoned(&self) -> bool {
        Arc::strong_count(&self.shared) == 1
    }
}

impl<T> Consumer<T> {
    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.shared.capacity()
    }

    /// Items available, refreshing our view of the producer only when needed for `wanted`.
    #[inline(always)]
    fn available(&mut self, wanted: usize) -> usize {
        let mut available = self.cached_tail.wrapping_sub(self.head);
        if available < wanted {
            // A1: pairs with the producer's Release store of `tail` (R1).
            self.cached_tail = self.shared.tail.load(Ordering::Acquire);
            available = self.cached_tail.wrapping_sub(self.head);
        }
        available
    }

    /// Items waiting as of now.
    pub fn len(&mut self) -> usize {
        self.available(usize::MAX)
    }

    /// Whether no item is waiting as of now.
    pub fn is_empty(&mut self) -> bool {
        self.available(1) == 0
    }

    #[inline(always)]
    fn read(&mut self) -> T {
        let value = self.shared.slot(self.head).with(|p| {
            // SAFETY: the slot at `head` was written by the producer and published (A1),
            // and only the consumer reads published slots; advancing `head` below means
            // it is read once.
            unsafe { (*p).assume_init_read() }
        });
        self.head = self.head.wrapping_add(1);
        value
    }

    #[inline(always)]
    fn publish(&mut self) {
        // R2: pairs with the producer's Acquire load of `head` (A2).
        self.shared.head.store(self.head, Ordering::Release);
        self.published_head = self.head;
    }

    /// Pop one value, if any.
    ///
    /// `head` is published when this pop takes the last item we know of (so an idle
    /// consumer never hides free space) and otherwise every `capacity / 16` pops. A
    /// producer facing a full ring then sees space in chunks and writes slots well away
    /// from the ones being read, instead of both threads trading one cache line per item.
    #[inline]
    pub fn pop(&mut self) -> Option<T> {
        if self.available(1) == 0 {
            return None;
        }
        let value = self.read();
        if self.head == self.cached_tail
            || self.head.wrapping_sub(self.published_head) >= self.publish_every
        {
            self.publish();
        }
        Some(value)
    }

    /// Pop up to `max` items into `sink`, publishing once. Returns how many were popped.
    pub fn pop_batch(&mut self, max: usize, mut sink: impl FnMut(T)) -> usize {
        let n = self.available(max).min(max);
        for _ in 0..n {
            // If `sink` panics, `head` already covers the items handed out and `Drop`
            // publishes it, so no item is dropped twice.
            sink(self.read());
        }
        if n > 0 {
            self.publish();
        }
        n
    }

    /// Copy up to `out.len()` items into `out`, publishing once. Returns how many.
    ///
    /// Like [`Producer::push_slice`], one bulk copy per contiguous run of slots.
    #[inline]
    pub fn pop_slice(&mut self, out: &mut [T]) -> usize
    where
        T: Copy,
    {
        let n = self.available(out.len()).min(out.len());
        if n == 0 {
            return 0;
        }
        let capacity = self.shared.capacity();
        let first = self.head & self.shared.mask;
        let (head_part, wrapped_part) = out[..n].split_at_mut(n.min(capacity - first));
        for (part, start) in [(head_part, first), (wrapped_part, 0)] {
            if part.is_empty() {
                continue;
            }
            self.shared.slot(start).with(|p| {
                // SAFETY: slots [start, start + part.len()) were written and published by
                // the producer (A1), are contiguous (the run stops at the wrap), and only
                // the consumer reads published slots. `T: Copy`, so reading leaves
                // nothing to drop.
                unsafe {
                    std::ptr::copy_nonoverlapping(p.cast::<T>(), part.as_mut_ptr(), part.len())
                }
            });
        }
        self.head = self.head.wrapping_add(n);
        self.publish();
        n
    }

    /// Whether the producer has been dropped (what is in the ring is all there will be).
    pub fn is_abandoned(&self) -> bool {
        Arc::strong_count(&self.shared) == 1
    }
}

impl<T> Drop for Consumer<T> {
    fn drop(&mut self) {
        // Publish items moved out but not yet published, so `Shared::drop` does not drop
        // them again.
        self.publish();
    }
}

impl<T> fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("capacity", &self.capacity())
            .finish_non_exhaustive()
    }
}

impl<T> fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("capacity", &self.capacity())
            .finish_non_exhaustive()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn capacity_rounds_up_to_a_power_of_two() {
        assert_eq!(channel::<u8>(1).0.capacity(), 1);
        assert_eq!(channel::<u8>(5).0.capacity(), 8);
        assert_eq!(channel::<u8>(64).1.capacity(), 64);
    }

    #[test]
    fn full_hands_the_value_back_and_order_is_fifo() {
        let (mut tx, mut rx) = channel(4);
        for i in 0..4 {
            tx.push(i).unwrap();
        }
        assert_eq!(tx.push(99), Err(Full(99)));
        assert_eq!(rx.pop(), Some(0));
        tx.push(4).unwrap();
        let mut got = vec![];
        rx.pop_batch(10, |v| got.push(v));
        assert_eq!(got, [1, 2, 3, 4]);
        assert_eq!(rx.pop(), None);
    }

    #[test]
    fn batches_stop_at_the_edges_and_keep_the_rest() {
        let (mut tx, mut rx) = channel(8);
        let mut items = 0..20;
        assert_eq!(tx.push_batch(&mut items), 8);
        assert_eq!(items.next(), Some(8), "untaken items stay in the iterator");
        let mut out = [0; 5];
        assert_eq!(rx.pop_slice(&mut out), 5);
        assert_eq!(out, [0, 1, 2, 3, 4]);
        assert_eq!(tx.push_slice(&[100, 101, 102, 103, 104, 105, 106]), 5);
        assert_eq!(rx.len(), 8);
        let mut out = [0; 16];
        assert_eq!(rx.pop_slice(&mut out), 8);
        assert_eq!(&out[..8], &[5, 6, 7, 100, 101, 102, 103, 104]);
    }

    #[test]
    fn counters_wrap_around() {
        let (mut tx, mut rx) = channel(4);
        tx.tail = usize::MAX - 2;
        tx.cached_head = usize::MAX - 2;
        rx.head = usize::MAX - 2;
        rx.cached_tail = usize::MAX - 2;
        tx.shared.head.store(usize::MAX - 2, Ordering::Relaxed);
        tx.shared.tail.store(usize::MAX - 2, Ordering::Relaxed);
        for round in 0..10u32 {
            assert_eq!(tx.push_slice(&[round, round + 1, round + 2]), 3);
            let mut out = [0; 3];
            assert_eq!(rx.pop_slice(&mut out), 3);
            assert_eq!(out, [round, round + 1, round + 2]);
        }
    }

    #[test]
    fn a_drained_consumer_always_publishes_the_space_it_freed() {
        let (mut tx, mut rx) = channel::<u32>(64);
        assert_eq!(rx.publish_every, 4);
        let all: Vec<u32> = (0..64).collect();
        assert_eq!(tx.push_slice(&all), 64);
        // One pop of many known items may stay unpublished...
        assert_eq!(rx.pop(), Some(0));
        assert!(tx.slots() <= 1);
        // ...but taking the last item the consumer knows of publishes everything.
        while rx.pop().is_some() {}
        assert_eq!(tx.slots(), 64);
    }

    #[test]
    fn unconsumed_items_are_dropped_exactly_once() {
        let token = Rc::new(());
        {
            let (mut tx, mut rx) = channel(8);
            for _ in 0..6 {
                tx.push(token.clone()).unwrap();
            }
            drop(rx.pop());
            drop(tx);
            assert!(rx.is_abandoned());
            assert_eq!(Rc::strong_count(&token), 6);
        }
        assert_eq!(Rc::strong_count(&token), 1);
    }

    #[test]
    fn a_panicking_sink_does_not_double_drop() {
        let token = Rc::new(());
        let (mut tx, mut rx) = channel(8);
        for _ in 0..4 {
            tx.push(token.clone()).unwrap();
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut seen = 0;
            rx.pop_batch(4, |_v| {
                seen += 1;
                if seen == 2 {
                    panic!("sink failed");
                }
            });
        }));
        assert!(result.is_err());
        drop(rx);
        drop(tx);
        assert_eq!(Rc::strong_count(&token), 1);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Model checks of every interleaving (run with `make loom`).
    use super::*;
    use loom::thread;

    #[test]
    fn single_items_arrive_in_order_through_a_small_ring() {
        loom::model(|| {
            let (mut tx, mut rx) = channel::<u32>(2);
            let producer = thread::spawn(move || {
                let mut next = 0;
                while next < 3 {
                    if tx.push(next).is_ok() {
                        next += 1;
                    } else {
                        thread::yield_now();
                    }
                }
            });
            let mut expected = 0;
            while expected < 3 {
                match rx.pop() {
                    Some(v) => {
                        assert_eq!(v, expected);
                        expected += 1;
                    }
                    None => thread::yield_now(),
                }
            }
            producer.join().unwrap();
        });
    }

    #[test]
    fn lazily_published_head_never_stalls_the_producer() {
        loom::model(|| {
            let (mut tx, mut rx) = channel::<u32>(2);
            // Publish only every second pop (or on draining), as large rings do.
            // Three items through two slots: the third push waits on a head the
            // consumer publishes lazily (a consumer publishing only after a third pop
            // fails here). A fourth item repeats that hand-over on the other slot and
            // took loom 74 s instead of 2.
            rx.publish_every = 2;
            let producer = thread::spawn(move || {
                let mut next = 0;
                while next < 3 {
                    if tx.push(next).is_ok() {
                        next += 1;
                    } else {
                        thread::yield_now();
                    }
                }
            });
            let mut expected = 0;
            while expected < 3 {
                match rx.pop() {
                    Some(v) => {
                        assert_eq!(v, expected);
                        expected += 1;
                    }
                    None => thread::yield_now(),
                }
            }
            producer.join().unwrap();
        });
    }

    #[test]
    fn batches_arrive_in_order_and_leftovers_are_dropped() {
        loom::model(|| {
            let (mut tx, mut rx) = channel::<Arc<u32>>(2);
            let producer = thread::spawn(move || {
                let mut items = (0..3).map(Arc::new);
                let mut sent = 0;
                while sent < 3 {
                    let n = tx.push_batch(&mut items);
                    if n == 0 {
                        thread::yield_now();
                    }
                    sent += n;
                }
            });
            let mut expected = 0;
            while expected < 2 {
                let n = rx.pop_batch(2, |v| {
                    assert_eq!(*v, expected);
                    expected += 1;
                });
                if n == 0 {
                    thread::yield_now();
                }
            }
            producer.join().unwrap();
            // The third item may still be in the ring; dropping both ends frees it.
        });
    }
}
