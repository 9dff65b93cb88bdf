//! Dirty tracking by comparison, for memory whose writers report nothing (a file
//! another process maps): each scan checksums every page and reports those whose CRC32C
//! differs from that of the content **last sent** to the destination.
//!
//! Comparing with what was sent, not with what the previous scan saw, matters: a page
//! read as C′ by a scan, rewritten to C and sent as C, then written back to C′ before the
//! next scan looks unchanged from scan to scan, yet the destination holds C. So the scan
//! reads the source's [`CrcTable`] (the workers record the CRC of every page they stage)
//! and asks the only question that counts: does memory differ from the destination's
//! copy?
//!
//! A change whose CRC equals the sent one (2^-32 per changed page) is missed; the
//! post-switchover audit or the full verification catches it. Each scan reads all memory.

use super::{DirtyBitmap, DirtyLog, DirtyLogError, DirtyLogKind};
use crate::crc_table::{CrcTable, OUT_OF_BAND_SLOT};
use crate::memory::{GuestMemory, PAGE_SIZE};
use std::sync::Arc;

/// Per-page CRC comparison against the content last sent.
pub struct RescanDirtyLog {
    memory: Arc<GuestMemory>,
    table: Arc<CrcTable>,
    page: Box<[u8; PAGE_SIZE]>,
}

impl RescanDirtyLog {
    /// Start tracking: until a page is sent, its baseline is its content now (recorded
    /// in the table outside any stream; round 0 then overwrites every entry).
    pub fn new(memory: Arc<GuestMemory>) -> Self {
        let table = Arc::new(CrcTable::new(memory.pages()));
        let mut log = RescanDirtyLog {
            memory,
            table,
            page: Box::new([0; PAGE_SIZE]),
        };
        for p in 0..log.memory.pages() {
            let crc = log.page_crc(p);
            log.table.record(p, crc, OUT_OF_BAND_SLOT);
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
            if self.page_crc(p) != self.table.get(p) {
                out.set(p);
            }
        }
        Ok(())
    }

    fn crc_table(&self) -> Option<Arc<CrcTable>> {
        Some(self.table.clone())
    }
}
