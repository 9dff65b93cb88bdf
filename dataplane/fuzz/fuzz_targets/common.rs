//! What the frame fuzz targets share: guest memory of 64 pages between inaccessible
//! guard regions, made once per process, so a stray write crashes the fuzzer.

use dwcp_dataplane::memory::{GuestMemory, PAGE_SIZE};
use dwcp_hugepages::PagePreference;
use std::sync::{Arc, OnceLock};

/// Pages of the fuzzed guest memory.
#[allow(dead_code)] // not every target needs it
pub const PAGES: u64 = 64;

/// The fuzzed guest memory.
pub fn memory() -> Arc<GuestMemory> {
    static MEMORY: OnceLock<Arc<GuestMemory>> = OnceLock::new();
    MEMORY
        .get_or_init(|| {
            Arc::new(GuestMemory::anonymous(PAGES as usize * PAGE_SIZE, PagePreference::Small).expect("memory"))
        })
        .clone()
}
