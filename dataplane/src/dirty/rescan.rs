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
//! post-switchover audit or the full verification catches it. Each scan reads all
//! memory, split across threads in 64-page-aligned ranges (one per CPU: the final scan
//! runs while the guest is paused, so the whole machine is ours), with the SIMD CRC
//! kernels; [`DirtyLog::scan_stats`] says how fast the last scan went.

use super::{DirtyBitmap, DirtyLog, DirtyLogError, DirtyLogKind};
use crate::crc_table::CrcTable;
use crate::memory::{GuestMemory, PAGE_SIZE, zero_page_crc};
use crate::transport::thread_cpu_time;
use std::sync::Arc;

/// Per-page CRC comparison against the content last sent.
pub struct RescanDirtyLog {
    memory: Arc<GuestMemory>,
    table: Arc<CrcTable>,
    threads: usize,
    stats: ScanStats,
}

/// How the scans went.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ScanStats {
    /// Scans done.
    pub scans: u64,
    /// Seconds the last scan took.
    pub last_seconds: f64,
    /// Bytes per second of the last scan.
    pub last_bytes_per_second: f64,
    /// Threads a scan runs on.
    pub threads: usize,
    /// Seconds the quickest scan took.
    pub quickest_seconds: f64,
    /// CPU seconds of the last scan's busiest thread: what the scan costs on CPUs of
    /// its own, as at the switchover, where nothing else runs (the wall time of a
    /// scan while the guest runs also holds the time the guest took the CPU from it).
    pub last_busy_seconds: f64,
}

impl RescanDirtyLog {
    /// Start tracking for a migration: until a page is sent its table entry is empty,
    /// so a scan reports it (round 0 sends every page before the first scan that
    /// counts, which makes reading all of memory for a baseline first wasted work).
    pub fn new(memory: Arc<GuestMemory>) -> Self {
        RescanDirtyLog {
            table: Arc::new(CrcTable::new(memory.pages())),
            memory,
            threads: crate::crc_table::scan_threads(),
            stats: ScanStats::default(),
        }
    }

    /// Start tracking with memory's content now as the baseline: the first scan
    /// reports only pages written since.
    pub fn with_baseline(memory: Arc<GuestMemory>) -> Self {
        let log = Self::new(memory);
        // On all threads, each recording into a digest slot of its own (no stream
        // records yet: the table is new); holes are not read.
        log.table.record_memory(&log.memory, log.threads);
        log
    }

    /// Mark in `out` every page whose CRC differs from the table's, on all threads;
    /// with `in_place`, reading the (quiescent) memory directly instead of copying each
    /// page out first.
    fn scan(&mut self, out: &mut DirtyBitmap, in_place: Option<&[u8]>) {
        let started = std::time::Instant::now();
        let pages = self.memory.pages();
        let threads = self.threads.clamp(1, 64) as u64;
        // Whole bitmap words per thread, so each fills words of its own.
        let words = pages.div_ceil(64);
        let per = words.div_ceil(threads).max(1) * 64;
        let (memory, table) = (&*self.memory, &*self.table);
        // Holes read as zeros, and reading one through the shared mapping would fill it
        // with a new page of this host's memory: they are not read. A hole filled after
        // this look still counts as zero in this scan; the next one reads it (the last
        // scan runs with the guest paused, when nothing fills one).
        let holes = self.memory.hole_pages();
        let holes = holes.as_ref();
        let zero_crc = zero_page_crc();
        let found: Vec<(u64, Vec<u64>, f64)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|t| (t * per, ((t + 1) * per).min(pages)))
                .filter(|(start, end)| start < end)
                .map(|(start, end)| {
                    scope.spawn(move || {
                        let cpu_start = thread_cpu_time();
                        let kernels = dwcp_simd::Kernels::active();
                        let mut copy = vec![0u8; PAGE_SIZE];
                        let mut bits = vec![0u64; (end - start).div_ceil(64) as usize];
                        for p in start..end {
                            let crc = match in_place {
                                _ if holes.is_some_and(|h| h.get(p)) => zero_crc,
                                Some(all) => {
                                    let at = p as usize * PAGE_SIZE;
                                    kernels.crc32c(&all[at..at + PAGE_SIZE])
                                }
                                None => {
                                    // Copy first: the page may be written while we read it.
                                    memory.read_page(p, &mut copy);
                                    kernels.crc32c(&copy)
                                }
                            };
                            if crc != table.get(p) {
                                let i = p - start;
                                bits[(i / 64) as usize] |= 1 << (i % 64);
                            }
                        }
                        (
                            start,
                            bits,
                            thread_cpu_time().saturating_sub(cpu_start).as_secs_f64(),
                        )
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        let busy = found.iter().map(|f| f.2).fold(0.0, f64::max);
        for (start, bits, _) in found {
            for (w, mut word) in bits.into_iter().enumerate() {
                while word != 0 {
                    let bit = u64::from(word.trailing_zeros());
                    out.set(start + w as u64 * 64 + bit);
                    word &= word - 1;
                }
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        self.stats = ScanStats {
            scans: self.stats.scans + 1,
            last_seconds: seconds,
            last_bytes_per_second: self.memory.len() as f64 / seconds.max(1e-9),
            threads: threads as usize,
            quickest_seconds: if self.stats.scans == 0 {
                seconds
            } else {
                self.stats.quickest_seconds.min(seconds)
            },
            last_busy_seconds: busy,
        };
    }
}

impl DirtyLog for RescanDirtyLog {
    fn kind(&self) -> DirtyLogKind {
        DirtyLogKind::Rescan
    }

    fn collect(&mut self, out: &mut DirtyBitmap) -> Result<(), DirtyLogError> {
        self.scan(out, None);
        Ok(())
    }

    unsafe fn collect_paused(&mut self, out: &mut DirtyBitmap) -> Result<(), DirtyLogError> {
        let memory = self.memory.clone();
        // SAFETY: the caller guarantees that nothing writes the memory during the call,
        // which is all `as_slice` asks; the slice does not outlive the call.
        let all = unsafe { memory.as_slice() };
        self.scan(out, Some(all));
        Ok(())
    }

    fn scan_stats(&self) -> Option<ScanStats> {
        Some(self.stats)
    }

    fn restart(&mut self, _pages: u64) -> Result<(), DirtyLogError> {
        // Scans compare memory with what was sent, not with the previous scan: an
        // interval needs no start.
        Ok(())
    }

    fn crc_table(&self) -> Option<Arc<CrcTable>> {
        Some(self.table.clone())
    }
}
