//! Per-page CRC32C tables: what each side of a migration holds, page by page.
//!
//! The source records the CRC of the content it sent for each page (computed anyway for
//! the page's frame); the destination records the CRC of what it placed (checked anyway
//! on arrival). Zero pages, dedup references and deltas record the resulting page's CRC.
//! So at any round boundary each side knows, without reading guest memory, what the
//! destination holds — the switchover compares the two tables instead of checksumming
//! all of memory while the guest is paused, and a resumed migration can find what is
//! missing by comparing them chunk by chunk.
//!
//! # The table digest
//! Comparing two tables must cost nothing that grows with memory at the switchover, so
//! each table keeps a running, order-independent digest: the sum (mod 2^64) over pages
//! of `H(page, crc)`, a 64-bit mix of the pair, minus the same for the empty table. A
//! record that changes a page from `old` to `new` adds `H(page, new) − H(page, old)`:
//! O(1) per page sent, and reading the digest is a sum over a few hundred slots. This is
//! the incremental "AdHash" construction of Bellare and Micciancio ("A New Paradigm for
//! Collision-free Hashing: Incrementality at Reduced Cost", EUROCRYPT 1997); with a good
//! mix, two different tables have the same digest with probability about 2^-64. It
//! guards against accidents (a lost frame, a page placed twice), not against an
//! attacker, who is kept out by the session's authentication.
//!
//! A chunked digest (one per group of pages, the dirty chunks recomputed at switchover)
//! would cost O(dirty chunks) there; the additive one costs O(1), and per-chunk digests
//! can still be summed from the entries whenever two sides must find where they differ.
//!
//! # Writers
//! Each page has one writer at a time (the worker whose stream carries it), and each
//! digest slot one writer (the stream it belongs to), so both use plain relaxed loads
//! and stores, no read-modify-write. Readers (the engine) read after the writers
//! reported the round finished through an event ring, whose Release/Acquire pair
//! orders the records before the read.

use crate::memory::{GuestMemory, PAGE_SIZE, zero_page_crc};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

/// Digest slots: one per data stream, and one for writers outside any stream.
const SLOTS: usize = crate::wire::MAX_STREAMS as usize + 1;

/// The slot for records made outside a data stream (a dirty log's baseline, tests).
pub const OUT_OF_BAND_SLOT: u16 = crate::wire::MAX_STREAMS;

/// A digest accumulator on a cache line of its own: streams of different workers
/// record side by side.
#[repr(align(64))]
struct DigestSlot(AtomicU64);

/// The CRC32C of every page of one guest memory as one side of a migration knows it,
/// with a running digest of the whole table.
pub struct CrcTable {
    crcs: Box<[AtomicU32]>,
    slots: Box<[DigestSlot]>,
}

/// A page's contribution to the digest: a 64-bit mix of its index and CRC.
#[inline]
fn entry_hash(page: u64, crc: u32) -> u64 {
    entry_hash_from(page_key(page), crc)
}

/// The page index spread over 64 bits (the splitmix64 finalizer, a bijection on u64).
#[inline]
fn page_key(page: u64) -> u64 {
    mix64(page ^ 0x6A09_E667_F3BC_C908)
}

/// A second round mixes in the CRC.
#[inline]
fn entry_hash_from(key: u64, crc: u32) -> u64 {
    mix64(key ^ u64::from(crc))
}

#[inline]
fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl std::fmt::Debug for CrcTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CrcTable({} pages, digest {:016x})",
            self.pages(),
            self.digest()
        )
    }
}

/// Where one stream records into a table: the table and the stream's digest slot.
#[derive(Clone, Copy)]
pub struct Recorder<'a> {
    table: &'a CrcTable,
    slot: u16,
}

impl Recorder<'_> {
    /// Record that `page` now holds content of CRC `crc`.
    #[inline]
    pub fn record(&self, page: u64, crc: u32) {
        self.table.record(page, crc, self.slot);
    }
}

/// What an audit found: pages whose memory no longer matches the table.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct AuditReport {
    /// Pages checked (all of memory).
    pub pages_checked: u64,
    /// Pages whose content differs from what the table says was sent.
    pub mismatched: u64,
    /// Their page numbers, ascending (the first [`AUDIT_PAGES_LISTED`]).
    pub pages: Vec<u64>,
    /// Time the audit took, seconds.
    pub seconds: f64,
    /// Rate it read memory at, bytes per second.
    pub bytes_per_second: f64,
    /// Threads it ran on.
    pub threads: usize,
}

/// Most mismatched page numbers an audit lists (the count is always exact).
pub const AUDIT_PAGES_LISTED: usize = 1024;

impl CrcTable {
    /// A table of `pages` pages, none recorded (every entry 0, digest 0).
    pub fn new(pages: u64) -> Self {
        CrcTable {
            crcs: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            slots: (0..SLOTS).map(|_| DigestSlot(AtomicU64::new(0))).collect(),
        }
    }

    /// Pages in the table.
    pub fn pages(&self) -> u64 {
        self.crcs.len() as u64
    }

    /// A recorder for stream `stream` (or [`OUT_OF_BAND_SLOT`]).
    pub fn recorder(&self, stream: u16) -> Recorder<'_> {
        Recorder {
            table: self,
            slot: stream.min(OUT_OF_BAND_SLOT),
        }
    }

    /// Record that `page` holds content of CRC `crc`, accounting the change in digest
    /// slot `slot`. Only the page's current writer may call this, and only that slot's
    /// writer (see the module docs); a page out of range is ignored (callers validate
    /// network input before it reaches here).
    #[inline]
    pub fn record(&self, page: u64, crc: u32, slot: u16) {
        let Some(entry) = self.crcs.get(page as usize) else {
            return;
        };
        // Relaxed: this thread is the page's only writer (module docs); readers are
        // ordered after it by the event ring that reports the round.
        let old = entry.load(Ordering::Relaxed);
        if old == crc {
            return;
        }
        entry.store(crc, Ordering::Relaxed);
        let key = page_key(page);
        let delta = entry_hash_from(key, crc).wrapping_sub(entry_hash_from(key, old));
        let slot = &self.slots[usize::from(slot).min(SLOTS - 1)].0;
        // Relaxed load and store: the slot has one writer (the stream it belongs to).
        slot.store(
            slot.load(Ordering::Relaxed).wrapping_add(delta),
            Ordering::Relaxed,
        );
    }

    /// The CRC recorded for `page` (0 if never recorded).
    #[inline]
    pub fn get(&self, page: u64) -> u32 {
        self.crcs[page as usize].load(Ordering::Relaxed)
    }

    /// The digest of the whole table: O(slots), independent of memory size.
    pub fn digest(&self) -> u64 {
        self.slots
            .iter()
            .fold(0u64, |acc, s| acc.wrapping_add(s.0.load(Ordering::Relaxed)))
    }

    /// The digest recomputed from the entries (O(pages)); equals [`CrcTable::digest`]
    /// when every record went through [`CrcTable::record`]. For tests and diagnosis.
    pub fn recompute_digest(&self) -> u64 {
        self.crcs.iter().enumerate().fold(0u64, |acc, (p, c)| {
            let crc = c.load(Ordering::Relaxed);
            acc.wrapping_add(entry_hash(p as u64, crc).wrapping_sub(entry_hash(p as u64, 0)))
        })
    }

    /// The digest of the entries of pages `first..first + count` (clamped to the
    /// table), as [`CrcTable::digest`] would be for a table holding only those: two
    /// sides find where their tables differ by comparing these chunk by chunk.
    pub fn range_digest(&self, first: u64, count: u64) -> u64 {
        let end = first.saturating_add(count).min(self.pages());
        (first.min(end)..end).fold(0u64, |acc, p| {
            let crc = self.crcs[p as usize].load(Ordering::Relaxed);
            if crc == 0 {
                // Never recorded: contributes nothing, as in the running digest.
                acc
            } else {
                acc.wrapping_add(entry_hash(p, crc).wrapping_sub(entry_hash(p, 0)))
            }
        })
    }

    /// [`CrcTable::range_digest`] of every chunk of `chunk_pages` pages, in order.
    pub fn chunk_digests(&self, chunk_pages: u64) -> Vec<u64> {
        let chunk_pages = chunk_pages.max(1);
        (0..self.pages().div_ceil(chunk_pages))
            .map(|c| self.range_digest(c * chunk_pages, chunk_pages))
            .collect()
    }

    /// Every entry from `first` (at most `count`), for sending a table whole.
    pub fn entries(&self, first: u64, count: usize) -> Vec<u32> {
        let start = (first as usize).min(self.crcs.len());
        let end = start.saturating_add(count).min(self.crcs.len());
        self.crcs[start..end]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// The table of what `memory` holds now: every page's CRC, read on `threads`
    /// threads (a full read: a restarted destination rebuilds its table from its
    /// memory file this way).
    pub fn from_memory(memory: &GuestMemory, threads: usize) -> Self {
        let table = CrcTable::new(memory.pages());
        table.record_memory(memory, threads);
        table
    }

    /// Record what `memory` holds now, every page, on `threads` threads (no other
    /// writer may record meanwhile).
    pub fn record_memory(&self, memory: &GuestMemory, threads: usize) {
        // Each thread has its own digest slot, as each stream does.
        let threads = threads.clamp(1, usize::from(crate::wire::MAX_STREAMS));
        let pages = memory.pages().min(self.pages());
        scan_pages(memory, pages, threads, |t, pages| {
            let recorder = self.recorder(t as u16);
            pages.for_each(|(p, crc)| recorder.record(p, crc));
        });
    }

    /// Compare `memory` with the table: every page's CRC against its entry, split over
    /// `threads` threads. Run with the memory quiescent for an exact answer (a page
    /// written meanwhile may show up as a mismatch).
    pub fn audit(&self, memory: &GuestMemory, threads: usize) -> AuditReport {
        let started = Instant::now();
        let pages = memory.pages().min(self.pages());
        let threads = threads.clamp(1, 64);
        let mut found = scan_pages(memory, pages, threads, |_, pages| {
            let mut count = 0u64;
            let mut listed = Vec::new();
            for (p, crc) in pages {
                if crc != self.get(p) {
                    count += 1;
                    if listed.len() < AUDIT_PAGES_LISTED {
                        listed.push(p);
                    }
                }
            }
            (count, listed)
        });
        let mismatched = found.iter().map(|(n, _)| n).sum();
        let mut listed: Vec<u64> = found.iter_mut().flat_map(|(_, l)| l.drain(..)).collect();
        listed.truncate(AUDIT_PAGES_LISTED);
        let seconds = started.elapsed().as_secs_f64();
        AuditReport {
            pages_checked: pages,
            mismatched,
            pages: listed,
            seconds,
            bytes_per_second: (pages as f64 * PAGE_SIZE as f64) / seconds.max(1e-9),
            threads,
        }
    }
}

/// Pages `0..pages` of `memory` split into `threads` ranges, one thread each: thread
/// `t` hands `per_thread` the CRC32C of each of its pages, in order, and its results
/// come back in thread order.
///
/// Pages in a memory file's holes (found first) count as zero pages without being
/// read: a read through a shared mapping would fill each hole with a new page. A hole
/// filled during the pass still counts as zero, so an exact answer needs the memory
/// quiescent, as it does anyway.
fn scan_pages<T: Send + Default>(
    memory: &GuestMemory,
    pages: u64,
    threads: usize,
    per_thread: impl Fn(usize, &mut dyn Iterator<Item = (u64, u32)>) -> T + Sync,
) -> Vec<T> {
    let per = pages.div_ceil(threads as u64).max(1);
    let per_thread = &per_thread;
    let holes = memory.hole_pages();
    let holes = holes.as_ref();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let start = (t as u64 * per).min(pages);
                let end = ((t as u64 + 1) * per).min(pages);
                scope.spawn(move || {
                    let kernels = dwcp_simd::Kernels::active();
                    let mut page = vec![0u8; PAGE_SIZE];
                    let mut crcs = (start..end).map(|p| {
                        if holes.is_some_and(|h| h.get(p)) {
                            return (p, zero_page_crc());
                        }
                        memory.read_page(p, &mut page);
                        (p, kernels.crc32c(&page))
                    });
                    per_thread(t, &mut crcs)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// Threads for a memory-wide pass (an audit, a rescan): every CPU this process may run on.
pub fn scan_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dwcp_hugepages::PagePreference;

    #[test]
    fn a_table_rebuilt_from_memory_equals_one_recorded_page_by_page() {
        let memory = GuestMemory::anonymous(300 * PAGE_SIZE, PagePreference::Small).unwrap();
        let recorded = CrcTable::new(300);
        for p in 0..300u64 {
            let content = vec![(p % 7) as u8; PAGE_SIZE];
            memory.write_page(p, &content);
            recorded.record(p, dwcp_simd::crc32c(&content), 0);
        }
        let rebuilt = CrcTable::from_memory(&memory, 3);
        assert_eq!(rebuilt.digest(), recorded.digest());
        assert_eq!(rebuilt.chunk_digests(64), recorded.chunk_digests(64));
    }

    #[test]
    fn chunk_digests_find_the_chunks_where_two_tables_differ() {
        let a = CrcTable::new(5000);
        let b = CrcTable::new(5000);
        for p in 0..5000 {
            a.record(p, p as u32 * 7 + 1, 0);
            b.record(p, p as u32 * 7 + 1, 3);
        }
        // Chunks sum to the whole table's digest.
        let sum = a
            .chunk_digests(1024)
            .iter()
            .fold(0u64, |acc, d| acc.wrapping_add(*d));
        assert_eq!(sum, a.digest());
        assert_eq!(a.chunk_digests(1024), b.chunk_digests(1024));
        // A page placed differently, and one never placed, each show in their chunk only.
        b.record(1500, 99, 0);
        b.record(4999, 0, 0);
        let (da, db) = (a.chunk_digests(1024), b.chunk_digests(1024));
        assert_eq!(da.len(), 5);
        let differing: Vec<usize> = (0..5).filter(|&c| da[c] != db[c]).collect();
        assert_eq!(differing, vec![1, 4]);
    }

    #[test]
    fn the_digest_follows_every_record_and_ignores_order() {
        let a = CrcTable::new(1000);
        let b = CrcTable::new(1000);
        assert_eq!(a.digest(), 0);
        for p in 0..1000u64 {
            a.record(p, (p * 7) as u32, (p % 4) as u16);
        }
        // The same final content, reached in another order, by other streams, through
        // intermediate values.
        for p in (0..1000u64).rev() {
            b.record(p, 12345, 9);
            b.record(p, (p * 7) as u32, (p % 3) as u16);
        }
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.digest(), a.recompute_digest());
        assert_eq!(b.digest(), b.recompute_digest());
        // One page different, or the same CRCs on swapped pages: different digests.
        b.record(500, 1, 0);
        assert_ne!(a.digest(), b.digest());
        b.record(500, 3500, 0);
        assert_eq!(a.digest(), b.digest());
        let c = CrcTable::new(1000);
        for p in 0..1000u64 {
            c.record(p, (p * 7) as u32, 0);
        }
        c.record(1, 14, 0);
        c.record(2, 7, 0);
        assert_ne!(a.digest(), c.digest());
    }

    #[test]
    fn an_audit_names_every_page_that_differs_from_the_table() {
        let memory = GuestMemory::anonymous(64 * PAGE_SIZE, PagePreference::Small).unwrap();
        let table = CrcTable::new(64);
        let mut page = vec![0u8; PAGE_SIZE];
        for p in 0..64 {
            memory.write_at(p, 0, &[p as u8 + 1]);
            memory.read_page(p, &mut page);
            table.record(p, dwcp_simd::crc32c(&page), 0);
        }
        assert_eq!(table.audit(&memory, 3).mismatched, 0);
        memory.write_at(7, 100, &[9]);
        memory.write_at(63, 4095, &[9]);
        let audit = table.audit(&memory, 3);
        assert_eq!(audit.mismatched, 2);
        assert_eq!(audit.pages, vec![7, 63]);
        assert_eq!(audit.pages_checked, 64);
    }
}
