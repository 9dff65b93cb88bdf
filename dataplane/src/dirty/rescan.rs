//! Dirty tracking by comparison, for memory whose writers report nothing (a file
//! another process maps): each scan checksums every page and reports those whose CRC32C
//! differs from that of the content **last sent** to the destination.
//!
//! Comparing with what was sent, not with what the previous scan saw, matters: a page
//! read as C′ by a scan, rewritten to C and sent as C, then written back to C′ before the
//! next scan looks unchanged from scan to scan, yet the destination holds C. So the
//! workers record the CRC of every page they stage in [`SentCrcs`], and the scan asks the
//! only question that counts: does memory differ from the destination's copy?
//!
//! A change whose CRC equals the sent one (2^-32 per changed page) is missed; the final
//! whole-memory verification catches it. Each scan reads all memory.

use super::{DirtyBitmap, DirtyLog, DirtyLogError, DirtyLogKind};
use crate::memory::{GuestMemory, PAGE_SIZE};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// CRC32C of the content last sent for each page, written by the transport workers as
/// they stage pages.
pub struct SentCrcs(Box<[AtomicU32]>);

impl SentCrcs {
    /// Record that `page` went out with content of CRC `crc`.
    #[inline]
    pub fn record(&self, page: u64, crc: u32) {
        if let Some(slot) = self.0.get(page as usize) {
            // Relaxed: the engine reads these only after the workers reported the round
            // sent, through the event ring, which orders them.
            slot.store(crc, Ordering::Relaxed);
        }
    }

    fn get(&self, page: u64) -> u32 {
        self.0[page as usize].load(Ordering::Relaxed)
    }
}

/// Per-page CRC comparison against the content last sent.
pub struct RescanDirtyLog {
    memory: Arc<GuestMemory>,
    sent: Arc<SentCrcs>,
    page: Box<[u8; PAGE_SIZE]>,
}

impl RescanDirtyLog {
    /// Start tracking: until a page is sent, its baseline is its content now.
    pub fn new(memory: Arc<GuestMemory>) -> Self {
        let sent = Arc::new(SentCrcs(
            (0..memory.pages()).map(|_| AtomicU32::new(0)).collect(),
        ));
        let mut log = RescanDirtyLog {
            memory,
            sent,
            page: Box::new([0; PAGE_SIZE]),
        };
        for p in 0..log.memory.pages() {
            let crc = log.page_crc(p);
            log.sent.record(p, crc);
        }
        log
    }

    fn page_crc(&mut self, page: u64) -> u32 {
        // Copy first: the page may be written while we read it (see memory.rs).
        self.memory.read_page(page, &mut self.page[..]);
        dwcp_simd::crc32c(&self.page[..])
    }
}

impl DirtyLog for RescanDirtyLog {
    fn kind(&self) -> DirtyLogKind {
        DirtyLogKind::Rescan
    }

    fn collect(&mut self, out: &mut DirtyBitmap) -> Result<(), DirtyLogError> {
        for p in 0..self.memory.pages() {
            if self.page_crc(p) != self.sent.get(p) {
                out.set(p);
            }
        }
        Ok(())
    }

    fn sent_crcs(&self) -> Option<Arc<SentCrcs>> {
        Some(self.sent.clone())
    }
}
