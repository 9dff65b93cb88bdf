//! The copy of each page as last sent, per stream: the base for XBZRLE deltas and the
//! pool of dedup candidates.
//!
//! Bounded in bytes (default 64 MiB, like QEMU's `xbzrle-cache-size`), evicting with
//! CLOCK (an LRU approximation: a page used since the hand last passed survives one
//! more pass). All storage and both indexes are sized when the cache is first enabled
//! ([`PageCache::allocate`], at a settings change), so inserting never allocates on the
//! fast path, and a session that never uses the cache never pays for it. One cache per
//! stream: a stream only ever refers to pages
//! it carries itself, so what the cache holds is exactly what the destination holds
//! for those pages, in stream order.

use crate::memory::PAGE_SIZE;
use std::collections::HashMap;

/// Pages last sent on one stream.
pub struct PageCache {
    slots: usize,
    data: Vec<u8>,
    page_of: Vec<u64>,
    crc_of: Vec<u32>,
    used_recently: Vec<bool>,
    slot_of: HashMap<u64, u32>,
    by_crc: HashMap<u32, u32>,
    hand: usize,
    filled: usize,
}

const EMPTY: u64 = u64::MAX;

impl PageCache {
    /// A cache of at most `bytes` of pages (rounded down to whole pages).
    pub fn new(bytes: usize) -> Self {
        PageCache {
            slots: bytes / PAGE_SIZE,
            data: Vec::new(),
            page_of: Vec::new(),
            crc_of: Vec::new(),
            used_recently: Vec::new(),
            slot_of: HashMap::new(),
            by_crc: HashMap::new(),
            hand: 0,
            filled: 0,
        }
    }

    /// Allocate the storage and indexes (once; later calls do nothing).
    pub fn allocate(&mut self) {
        if self.page_of.len() == self.slots {
            return;
        }
        let slots = self.slots;
        // Zeroed allocations are mapped lazily: untouched slots cost nothing.
        self.data = vec![0u8; slots * PAGE_SIZE];
        self.page_of = vec![EMPTY; slots];
        self.crc_of = vec![0; slots];
        self.used_recently = vec![false; slots];
        self.slot_of = HashMap::with_capacity(slots);
        self.by_crc = HashMap::with_capacity(slots);
    }

    /// Slots.
    pub fn capacity(&self) -> usize {
        self.slots
    }

    /// Pages cached.
    pub fn len(&self) -> usize {
        self.slot_of.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.slot_of.is_empty()
    }

    fn slot(&self, slot: u32) -> &[u8] {
        let at = slot as usize * PAGE_SIZE;
        &self.data[at..at + PAGE_SIZE]
    }

    /// The content last sent for `page`, if cached.
    #[inline]
    pub fn get(&mut self, page: u64) -> Option<&[u8]> {
        let slot = *self.slot_of.get(&page)?;
        self.used_recently[slot as usize] = true;
        Some(self.slot(slot))
    }

    /// A cached page other than `page` whose content equals `content` (whose CRC32C is
    /// `crc`), confirmed byte for byte. The second value is whether the CRC matched a
    /// different content (a collision, counted by callers).
    pub fn find_duplicate(&mut self, page: u64, crc: u32, content: &[u8]) -> (Option<u64>, bool) {
        let Some(&slot) = self.by_crc.get(&crc) else {
            return (None, false);
        };
        let other = self.page_of[slot as usize];
        if other == page {
            return (None, false);
        }
        if self.slot(slot) == content {
            self.used_recently[slot as usize] = true;
            (Some(other), false)
        } else {
            (None, true)
        }
    }

    /// Record that `page` was sent with `content` (CRC32C `crc`).
    pub fn put(&mut self, page: u64, content: &[u8], crc: u32) {
        if self.capacity() == 0 {
            return;
        }
        self.allocate();
        let slot = match self.slot_of.get(&page) {
            Some(&s) => {
                self.unindex_crc(s);
                s
            }
            None => {
                let s = self.victim();
                let old = self.page_of[s as usize];
                if old != EMPTY {
                    self.slot_of.remove(&old);
                    self.unindex_crc(s);
                }
                self.page_of[s as usize] = page;
                self.slot_of.insert(page, s);
                s
            }
        };
        let at = slot as usize * PAGE_SIZE;
        self.data[at..at + PAGE_SIZE].copy_from_slice(content);
        self.crc_of[slot as usize] = crc;
        self.used_recently[slot as usize] = true;
        self.by_crc.insert(crc, slot);
    }

    /// Forget `page` (its destination copy changed in a way the cache cannot follow).
    pub fn remove(&mut self, page: u64) {
        if let Some(slot) = self.slot_of.remove(&page) {
            self.unindex_crc(slot);
            self.page_of[slot as usize] = EMPTY;
            self.used_recently[slot as usize] = false;
        }
    }

    /// Forget everything.
    pub fn clear(&mut self) {
        self.slot_of.clear();
        self.by_crc.clear();
        self.page_of.fill(EMPTY);
        self.used_recently.fill(false);
        self.filled = 0;
        self.hand = 0;
    }

    fn unindex_crc(&mut self, slot: u32) {
        let crc = self.crc_of[slot as usize];
        if self.by_crc.get(&crc) == Some(&slot) {
            self.by_crc.remove(&crc);
        }
    }

    /// A slot to reuse: an empty one while there are any, then CLOCK.
    fn victim(&mut self) -> u32 {
        if self.filled < self.capacity() {
            self.filled += 1;
            return (self.filled - 1) as u32;
        }
        loop {
            let s = self.hand;
            self.hand = (self.hand + 1) % self.capacity();
            if self.page_of[s] == EMPTY || !self.used_recently[s] {
                return s as u32;
            }
            self.used_recently[s] = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(byte: u8) -> Vec<u8> {
        vec![byte; PAGE_SIZE]
    }

    #[test]
    fn keeps_the_last_copy_and_evicts_unused_pages_first() {
        let mut c = PageCache::new(3 * PAGE_SIZE);
        c.put(10, &page(1), 100);
        c.put(11, &page(2), 200);
        c.put(12, &page(3), 300);
        c.put(10, &page(4), 400);
        assert_eq!(c.get(10).unwrap()[0], 4, "updated in place");
        assert_eq!(c.len(), 3);
        // The hand clears every recent bit once, then takes the first slot (page 10)...
        c.put(13, &page(5), 500);
        assert!(c.get(10).is_none());
        // ...and page 11, not used since, goes next even though 12 came later.
        let _ = c.get(12);
        c.put(14, &page(6), 600);
        assert!(c.get(11).is_none());
        assert!(c.get(12).is_some() && c.get(13).is_some() && c.get(14).is_some());
    }

    #[test]
    fn duplicates_are_confirmed_byte_for_byte() {
        let mut c = PageCache::new(4 * PAGE_SIZE);
        c.put(1, &page(7), 77);
        assert_eq!(c.find_duplicate(2, 77, &page(7)), (Some(1), false));
        assert_eq!(
            c.find_duplicate(1, 77, &page(7)),
            (None, false),
            "not itself"
        );
        assert_eq!(
            c.find_duplicate(2, 77, &page(8)),
            (None, true),
            "same CRC, other bytes"
        );
        c.put(1, &page(9), 99);
        assert_eq!(
            c.find_duplicate(2, 77, &page(7)),
            (None, false),
            "old content unindexed"
        );
        c.remove(1);
        assert!(c.get(1).is_none());
        assert_eq!(c.find_duplicate(2, 99, &page(9)), (None, false));
    }

    #[test]
    fn a_zero_sized_cache_holds_nothing() {
        let mut c = PageCache::new(0);
        c.put(1, &page(1), 1);
        assert!(c.get(1).is_none());
        assert!(c.is_empty());
    }
}
